// Kernel-map building on the CPU: output-major neighbour tables nbr[out_row, tap] = input row or -1.
//
// Sites are linearised to int64 keys (batch slowest, last dim fastest) and radix-sorted (sites that come
// sorted skip the sort). A row table records where the sorted sites of each grid row (all dimensions but
// the last) start; merge_rows then takes each run of outputs in one row and, per tap row, spreads the one
// input row it reads into a dense line, so each tap along the last dimension is a single load.
// Strided and transposed convs first mark every reachable output in a bitmap of the output grid and read
// the set bits in order. Grids too large for these tables fall back to sort-unique and merge_taps, a
// linear merge of each tap against the sorted input keys.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <sstream>
#include <string>
#include <tuple>

#include "spconv/checks.h"
#include "spconv/geometry.h"
#include "spconv/radix_sort.h"

namespace spconv {
namespace {

inline void read_coord(const int32_t* row, int ndim, int64_t* batch, Coord* c) {
  *batch = row[0];
  for (int d = 0; d < ndim; ++d) (*c)[d] = row[1 + d];
}

// indices [N, 1 + ndim] int32 on the CPU (returned contiguous), every batch index in [0, batch_size) and every
// coordinate in [0, shape[d]): a parallel per-column min/max pass.
at::Tensor check_indices(const at::Tensor& indices_in, int ndim, int64_t batch_size, at::IntArrayRef shape,
                         const char* op, const char* shape_arg) {
  check_cpu(indices_in, op, "indices");
  TORCH_CHECK_TYPE(indices_in.scalar_type() == at::kInt, "spconv.", op, ": indices must be int32, got ",
                   indices_in.scalar_type(), "; convert them with .int()");
  TORCH_CHECK_VALUE(indices_in.dim() == 2 && indices_in.size(1) == ndim + 1, "spconv.", op,
                    ": indices must be [N, 1 + ndim] = [N, ", ndim + 1, "] (batch index, then one column per entry of ",
                    shape_arg, " = ", shape, "), got shape ", indices_in.sizes());
  TORCH_CHECK_VALUE(indices_in.size(0) < (int64_t(1) << 31), "spconv.", op, ": at most 2^31-1 sites are supported, got ",
                    indices_in.size(0));
  at::Tensor indices = indices_in.contiguous();
  int32_t lo[kMaxDim + 1], hi[kMaxDim + 1];
  const int64_t n = indices.size(0);
  column_min_max(indices.data_ptr<int32_t>(), n, ndim + 1, lo, hi);
  if (n == 0) return indices;
  TORCH_CHECK_VALUE(lo[0] >= 0 && hi[0] < batch_size, "spconv.", op, ": batch indices (indices column 0) range over [",
                    lo[0], ", ", hi[0], "] but must be in [0, batch_size=", batch_size,
                    "): pass the right batch_size or fix the indices");
  for (int d = 0; d < ndim; ++d) {
    TORCH_CHECK_VALUE(lo[d + 1] >= 0 && hi[d + 1] < shape[d], "spconv.", op, ": coordinates of spatial dimension ", d,
                      " (indices column ", d + 1, ") range over [", lo[d + 1], ", ", hi[d + 1], "] but must be in [0, ",
                      shape[d], ") for ", shape_arg, " = ", shape,
                      ": drop or clamp the sites outside the grid, or enlarge the spatial shape");
  }
  return indices;
}

// batch_size * prod(shape) < 2^62: keys (batch, coordinates) fit int64 with room for arithmetic
void check_key_volume(int64_t batch_size, at::IntArrayRef shape, const char* op, const char* what,
                      const std::string& geometry) {
  __int128 v = batch_size;
  for (int64_t s : shape) v *= s;  // each factor <= 2^31 and at most 5 of them: no overflow of 128 bits
  TORCH_CHECK_VALUE(v < (__int128(1) << 62), "spconv.", op, ": the ", what, " grid batch_size x prod(shape) = ",
                    batch_size, " x prod(", shape, ") has ", static_cast<double>(v),
                    " cells, more than the 2^62 that int64 site keys hold", geometry,
                    ": reduce the spatial shape, stride, padding or dilation, or split the batch");
}

std::string describe(const char* op, at::IntArrayRef in_shape, at::IntArrayRef out_shape, at::IntArrayRef ksize,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed) {
  std::ostringstream os;
  os << " (" << (transposed ? "transposed conv" : "conv") << " of input spatial shape " << in_shape
     << " to output spatial shape " << out_shape << " with kernel_size=" << ksize << ", stride=" << stride
     << ", padding=" << padding << ", dilation=" << dilation << ")";
  return os.str();
}

// The geometry lists of a kernel-map op: one entry per dimension, shapes and ksize/stride/dilation in
// [1, 2^31-1], padding in [0, 2^31-1], batch_size in [1, 2^31-1], a kernel volume that a table can have, and
// every coordinate the map computes (y * s - p + k * d and its transposed form) well inside int64.
void check_geometry(const char* op, int ndim, int64_t batch_size, at::IntArrayRef in_shape, at::IntArrayRef out_shape,
                    at::IntArrayRef ksize, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    bool transposed, bool subm) {
  const char* shape_arg = subm ? "spatial_shape" : "in_shape";
  TORCH_CHECK_VALUE(ndim >= 1 && ndim <= kMaxDim, "spconv.", op, ": ", shape_arg, " must have 1 to ", kMaxDim,
                    " entries (one per spatial dimension), got ", in_shape);
  TORCH_CHECK_VALUE(batch_size >= 1 && batch_size <= kInt32Max, "spconv.", op, ": batch_size must be in [1, 2^31-1], got ",
                    batch_size);
  check_dims(in_shape, ndim, 1, op, shape_arg);
  check_dims(ksize, ndim, 1, op, "ksize");
  if (!subm) check_dims(stride, ndim, 1, op, "stride");
  if (!subm) check_dims(padding, ndim, 0, op, "padding");
  check_dims(dilation, ndim, 1, op, "dilation");
  int64_t volume = 1;
  for (int d = 0; d < ndim; ++d) {
    volume *= ksize[d];
    TORCH_CHECK_VALUE(volume <= (int64_t(1) << 20), "spconv.", op, ": kernel volume prod(ksize) = prod(", ksize,
                      ") is larger than 2^20 taps; use a smaller kernel");
  }
  if (subm) {
    check_key_volume(batch_size, in_shape, op, "input", "");
    for (int d = 0; d < ndim; ++d) {
      const __int128 span = __int128(in_shape[d]) + __int128(ksize[d]) * dilation[d];
      TORCH_CHECK_VALUE(span < (__int128(1) << 62), "spconv.", op, ": kernel_size x dilation in dimension ", d, " (",
                        ksize[d], " x ", dilation[d], ") is too large for int64 coordinates");
    }
    return;
  }
  const std::string geometry = describe(op, in_shape, out_shape, ksize, stride, padding, dilation, transposed);
  TORCH_CHECK_VALUE(static_cast<int>(out_shape.size()) == ndim, "spconv.", op, ": out_shape has ", out_shape.size(),
                    " entries, expected ", ndim, geometry);
  for (int d = 0; d < ndim; ++d) {
    TORCH_CHECK_VALUE(out_shape[d] >= 1, "spconv.", op, ": out_shape[", d, "] = ", out_shape[d], " must be positive",
                      geometry);
    TORCH_CHECK_VALUE(out_shape[d] <= kInt32Max, "spconv.", op, ": output spatial size ", out_shape[d],
                      " in dimension ", d, " does not fit the int32 coordinates of indices (at most 2^31-1)", geometry,
                      ": reduce the padding, stride, dilation or input size");
  }
  check_key_volume(batch_size, in_shape, op, "input", geometry);
  check_key_volume(batch_size, out_shape, op, "output", geometry);
  for (int d = 0; d < ndim; ++d) {
    // largest coordinate a tap computes: non-transposed the input y * s - p + k * d, transposed the output
    // x * s - p + k * d (padding is subtracted: it only bounds the low end, which is >= -2^31)
    const int64_t from = transposed ? in_shape[d] : out_shape[d];
    const __int128 span = __int128(from - 1) * stride[d] + __int128(ksize[d] - 1) * dilation[d] + padding[d];
    TORCH_CHECK_VALUE(span < (__int128(1) << 62), "spconv.", op, ": dimension ", d,
                      " reaches coordinates beyond 2^62", geometry, ": reduce the stride or dilation");
  }
}

// A new table of >= 1 MB whose pages the kernel has not mapped yet (a fresh mmap from the allocator) would take
// one page fault per 4 KB page while the builder writes it, at a few microseconds each in a virtual machine:
// MADV_POPULATE_WRITE (Linux 5.14+) maps them all in one call. It is only asked for when the block's first
// whole page is not mapped (mincore), as in a fresh block: on mapped pages it would cost a walk of each. Where
// either call is not supported it fails harmlessly and the pages fault as before.
at::Tensor new_table(int64_t rows, int64_t cols, const at::TensorOptions& options) {
  at::Tensor t = at::empty({rows, cols}, options);
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  const size_t bytes = static_cast<size_t>(t.numel()) * sizeof(int32_t);
  if (bytes >= (size_t(1) << 20)) {
    const uintptr_t page = 4096, lo = (reinterpret_cast<uintptr_t>(t.data_ptr()) + page - 1) & ~(page - 1);
    const uintptr_t hi = (reinterpret_cast<uintptr_t>(t.data_ptr()) + bytes) & ~(page - 1);
    unsigned char resident = 1;
    if (hi > lo && mincore(reinterpret_cast<void*>(lo), page, &resident) == 0 && !(resident & 1))
      madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_POPULATE_WRITE);
  }
#endif
  return t;
}

int64_t max_key(int64_t batch_size, const Coord& shape, int ndim) {
  int64_t v = batch_size;
  for (int d = 0; d < ndim; ++d) v *= shape[d];
  return v - 1;
}

// The input sites sorted by key: keys ascending, rows[i] = the row of the i-th smallest key.
struct SortedSites {
  std::vector<int64_t> keys;
  std::vector<int32_t> rows;
  bool presorted = false;  // the sites came sorted: rows[i] == i
};

SortedSites sort_sites(const at::Tensor& indices, const Coord& shape, int ndim, int64_t batch_size) {
  const int64_t n = indices.size(0);
  const int32_t* idx = indices.data_ptr<int32_t>();
  SortedSites s;
  s.keys.resize(n);
  s.rows.resize(n);
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t b;
      Coord c;
      read_coord(idx + i * (ndim + 1), ndim, &b, &c);
      s.keys[i] = linear_key(b, c, shape, ndim);
      s.rows[i] = static_cast<int32_t>(i);
    }
  });
  // sites that come sorted (every conv's output) need neither the sort nor the duplicate scan below
  std::atomic<bool> increasing{true};
  at::parallel_for(1, std::max<int64_t>(n, 1), 65536, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      if (s.keys[i] <= s.keys[i - 1]) {
        increasing.store(false, std::memory_order_relaxed);
        return;
      }
  });
  if (increasing.load()) {
    s.presorted = true;
    return s;
  }
  radix_sort(s.keys, s.rows, max_key(batch_size, shape, ndim));
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(s.keys[i] != s.keys[i - 1], "spconv: indices contain duplicate sites (rows ",
                      std::min(s.rows[i - 1], s.rows[i]), " and ", std::max(s.rows[i - 1], s.rows[i]),
                      " hold the same (batch, coordinate)); merge duplicates first, e.g. with "
                      "torch.unique(indices, dim=0, return_inverse=True) and a scatter-add of the features");
  }
  return s;
}

// Input coordinate that output y reads through tap r, or false when there is none.
inline bool input_of(const ConvGeometry& g, bool transposed, const Coord& y, int64_t r, Coord* x) {
  for (int d = 0; d < g.ndim; ++d) {
    int64_t v;
    if (transposed) {
      int64_t t = y[d] + g.padding[d] - g.offsets[r][d] * g.dilation[d];
      if (t < 0 || t % g.stride[d] != 0) return false;
      v = t / g.stride[d];
    } else {
      v = y[d] * g.stride[d] - g.padding[d] + g.offsets[r][d] * g.dilation[d];
    }
    if (v < 0 || v >= g.in_shape[d]) return false;
    (*x)[d] = v;
  }
  return true;
}

// Position of the first key >= target, searching forward from p (p < 0: not placed yet): a few linear
// steps, then galloping (doubling steps, then a binary search in the last gap) so that long jumps stay
// near p in memory.
inline int64_t seek(const int64_t* keys, int64_t n, int64_t p, int64_t target) {
  if (p < 0) return std::lower_bound(keys, keys + n, target) - keys;
  for (int steps = 0; steps < 8; ++steps) {
    if (p >= n || keys[p] >= target) return p;
    ++p;
  }
  int64_t step = 8, lo = p;
  while (p + step < n && keys[p + step] < target) {
    lo = p + step;
    step *= 2;
  }
  const int64_t hi = std::min(n, p + step + 1);
  return std::lower_bound(keys + lo, keys + hi, target) - keys;
}

// Fills nbr[out_row, r] for outputs visited in increasing key order: out_keys[o] (sorted), out_rows[o].
// Works in chunks of outputs; inside a chunk, tap by tap, so the inner loop is a tight merge.
void merge_taps(const ConvGeometry& g, bool transposed, const SortedSites& in, const std::vector<int64_t>& out_keys,
                const int32_t* out_rows, int32_t* nbr) {
  constexpr int64_t kChunk = 512;
  const int64_t m = static_cast<int64_t>(out_keys.size()), kv = g.kernel_volume, n = in.keys.size();
  const int ndim = g.ndim;
  Coord in_stride{};  // key stride of each input dimension
  int64_t in_volume = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    in_stride[d] = in_volume;
    in_volume *= g.in_shape[d];
  }
  // Key arithmetic wraps (uint64): terms of dimensions whose tap falls off the grid may pass int64, but those
  // taps are skipped, and every key that is used is a true key (< 2^62), which modular sums give exactly.
  std::vector<int64_t> tap_delta(kv, 0);  // key offset of tap r relative to the window origin
  for (int64_t r = 0; r < kv; ++r) {
    uint64_t delta = 0;
    for (int d = 0; d < ndim; ++d) delta += uint64_t(g.offsets[r][d] * g.dilation[d]) * uint64_t(in_stride[d]);
    tap_delta[r] = static_cast<int64_t>(delta);
  }
  const int64_t* keys = in.keys.data();
  const int32_t* rows = in.rows.data();
  const int64_t n_chunks = (m + kChunk - 1) / kChunk;
  at::parallel_for(0, n_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<int64_t> base(kChunk);  // key of the window origin (may lie outside the grid)
    std::vector<Coord> origin(kChunk);  // window origin y * s - p per dimension
    std::vector<Coord> outc(kChunk);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t o0 = chunk * kChunk, cm = std::min(kChunk, m - o0);
      for (int64_t t = 0; t < cm; ++t) {
        int64_t b;
        decode_key(out_keys[o0 + t], g.out_shape, ndim, &b, &outc[t]);
        uint64_t key = uint64_t(b) * uint64_t(in_volume);
        for (int d = 0; d < ndim; ++d) {
          origin[t][d] = outc[t][d] * g.stride[d] - g.padding[d];
          key += uint64_t(origin[t][d]) * uint64_t(in_stride[d]);
        }
        base[t] = static_cast<int64_t>(key);
      }
      if (transposed) {
        for (int64_t r = 0; r < kv; ++r) {
          int64_t p = -1;
          for (int64_t t = 0; t < cm; ++t) {
            int32_t* cell = nbr + int64_t(out_rows ? out_rows[o0 + t] : o0 + t) * kv + r;
            Coord x;
            if (!input_of(g, true, outc[t], r, &x)) {
              *cell = -1;
              continue;
            }
            int64_t b = out_keys[o0 + t];
            for (int d = 0; d < ndim; ++d) b /= g.out_shape[d];
            const int64_t target = linear_key(b, x, g.in_shape, ndim);
            p = seek(keys, n, p, target);
            *cell = (p < n && keys[p] == target) ? rows[p] : -1;
          }
        }
        continue;
      }
      // Taps come in rows along the last dimension: one seek per row, then a short walk along it.
      const int last = ndim - 1;
      const int64_t k_last = g.ksize[last], dil_last = g.dilation[last], in_last = g.in_shape[last];
      for (int64_t row0 = 0; row0 < kv; row0 += k_last) {
        int64_t p = -1;
        for (int64_t t = 0; t < cm; ++t) {
          int32_t* cells = nbr + int64_t(out_rows ? out_rows[o0 + t] : o0 + t) * kv + row0;
          bool inside = true;
          for (int d = 0; d < last; ++d) {
            const int64_t x = origin[t][d] + g.offsets[row0][d] * g.dilation[d];
            inside &= (x >= 0) & (x < g.in_shape[d]);
          }
          if (!inside) {
            for (int64_t rl = 0; rl < k_last; ++rl) cells[rl] = -1;
            continue;
          }
          const int64_t first = static_cast<int64_t>(uint64_t(base[t]) + uint64_t(tap_delta[row0]));
          p = seek(keys, n, p, first);
          int64_t q = p;
          for (int64_t rl = 0; rl < k_last; ++rl) {
            const int64_t x = origin[t][last] + rl * dil_last;
            if (x < 0 || x >= in_last) {
              cells[rl] = -1;
              continue;
            }
            const int64_t target = first + rl * dil_last;
            while (q < n && keys[q] < target) ++q;
            cells[rl] = (q < n && keys[q] == target) ? rows[q] : -1;
          }
        }
      }
    }
  });
}

// Where the sorted input sites of each grid row (all dimensions but the last, batch included) start:
// row r holds the sorted positions start[r] .. start[r + 1] - 1, whose last coordinates are last[...].
// (Arrays without value-initialisation: build_row_index writes every entry once.)
struct RowIndex {
  std::unique_ptr<int32_t[]> start, last;
};

// Builds the row index, or returns false when the grid has too many rows for a dense row table or rows too
// long for merge_rows' dense line (the callers then fall back to merge_taps). In parallel over the sorted
// sites: start[r] is the first site whose row is >= r, so each site writes the entries of the rows from the
// previous site's row (exclusive) to its own (inclusive), and no entry is written twice.
bool build_row_index(const SortedSites& in, const Coord& shape, int ndim, int64_t batch_size, RowIndex* ri) {
  const int64_t n = in.keys.size(), x_size = shape[ndim - 1];
  if (x_size > (int64_t(1) << 20)) return false;  // merge_rows keeps one dense line of this length per thread
  int64_t rows = batch_size;
  for (int d = 0; d < ndim - 1; ++d) {
    rows *= shape[d];
    if (rows > 16 * n + (int64_t(1) << 20)) return false;
  }
  ri->start.reset(new int32_t[rows + 1]);
  ri->last.reset(new int32_t[std::max<int64_t>(n, 1)]);
  int32_t* start = ri->start.get();
  int32_t* last = ri->last.get();
  const int64_t* keys = in.keys.data();
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    int64_t prev = begin == 0 ? -1 : keys[begin - 1] / x_size;  // row of the site before this chunk
    int64_t r = prev, row_end = (prev + 1) * x_size;          // keys are sorted: divide only at a new row
    for (int64_t i = begin; i < end; ++i) {
      const int64_t key = keys[i];
      if (key >= row_end) {
        r = key / x_size;
        row_end = (r + 1) * x_size;
        for (int64_t q = prev + 1; q <= r; ++q) start[q] = static_cast<int32_t>(i);
        prev = r;
      }
      last[i] = static_cast<int32_t>(key - r * x_size);
    }
  });
  const int64_t last_row = n > 0 ? keys[n - 1] / x_size : -1;
  std::fill(start + last_row + 1, start + rows + 1, static_cast<int32_t>(n));
  return true;
}

// Input coordinate along dimension d that output coordinate y reads through kernel offset k, or -1.
inline int64_t input_coord(const ConvGeometry& g, bool transposed, int d, int64_t y, int64_t k) {
  int64_t v;
  if (transposed) {
    const int64_t t = y + g.padding[d] - k * g.dilation[d];
    if (t < 0) return -1;
    const uint32_t q = static_cast<uint32_t>(t) / static_cast<uint32_t>(g.stride[d]);  // coordinates fit 31 bits
    if (int64_t(q) * g.stride[d] != t) return -1;
    v = q;
  } else {
    v = y * g.stride[d] - g.padding[d] + k * g.dilation[d];
  }
  return (v >= 0 && v < g.in_shape[d]) ? v : -1;
}

// Length of merge_rows' per-thread dense line (see there): the input row plus margins for the taps that fall
// off it, which grow with padding, stride and dilation.
int64_t dense_line_size(const ConvGeometry& g, bool transposed) {
  const int last = g.ndim - 1;
  if (transposed) return g.in_shape[last];
  return std::max(g.in_shape[last], (g.out_shape[last] - 1) * g.stride[last] + (g.ksize[last] - 1) * g.dilation[last] +
                                        1) +
         g.padding[last];
}

// merge_rows only when its dense line stays small next to the work (the number of sites): a large padding or
// dilation (2^26 on a 2-site input) would otherwise make every thread allocate and fill gigabytes; merge_taps
// needs memory in proportion to the sites alone.
bool fits_dense_line(const ConvGeometry& g, bool transposed, int64_t sites) {
  return dense_line_size(g, transposed) <= std::max<int64_t>(int64_t(1) << 20, 4 * sites);
}

// Fills nbr through the row index. Outputs are visited in increasing key order o = 0..m-1: out_keys[o] is the
// sorted key of output o in the output grid (batch, g.out_shape). Either coords ([M, 1 + D], rows in that same
// order) gives their coordinates and table row o, or order gives table row order[o] and the runs of outputs in
// one grid row (all dimensions but the last) are found and decoded from the keys, so that outputs in a random
// row order (the first layer's raw voxel order) cost no random reads. For each run and each tap row
// (the kernel offsets of all dimensions but the last), the single input row it reads is spread into a dense
// per-thread line indexed by the last coordinate (with margins that read as -1, so taps that fall off the
// grid need no test); every tap along the last dimension is then one load. A run's table rows are filled in a
// small per-thread buffer and, with an order, copied out row by row: one write of each whole row.
template <bool kTransposed>
void merge_rows(const ConvGeometry& g, const SortedSites& in, const RowIndex& ri, int64_t m, const int64_t* out_keys,
                const int32_t* coords, const int32_t* order, int32_t* nbr) {
  const int ndim = g.ndim, last = ndim - 1;
  const int64_t kv = g.kernel_volume, k_last = g.ksize[last], x_out = g.out_shape[last];
  const int64_t s_last = g.stride[last], p_last = g.padding[last], d_last = g.dilation[last];
  // line[margin + x] holds input x; non-transposed taps read x = y * s - p + rl * dil in
  // [-p, (out - 1) * s - p + (k - 1) * dil], transposed ones an x in [0, in) or none
  const int64_t margin = kTransposed ? 0 : p_last;
  const int64_t line_size = dense_line_size(g, kTransposed);
  const int32_t* rows = in.rows.data();
  const int32_t* start = ri.start.get();
  const int32_t* xs = ri.last.get();
  // per tap row (kernel offsets of all dimensions but the last): its key offset in input-row units
  const int64_t tap_rows = kv / k_last;
  std::vector<int64_t> row_delta(tap_rows, 0);
  Coord row_stride{};  // input-row index stride of each dimension but the last
  int64_t rs = 1;
  for (int d = last - 1; d >= 0; --d) {
    row_stride[d] = rs;
    rs *= g.in_shape[d];
  }
  const int64_t batch_rows = rs;
  for (int64_t t = 0; t < tap_rows; ++t) {  // wrapping sums, as in merge_taps
    uint64_t delta = 0;
    for (int d = 0; d < last; ++d) delta += uint64_t(g.offsets[t * k_last][d] * g.dilation[d]) * uint64_t(row_stride[d]);
    row_delta[t] = static_cast<int64_t>(delta);
  }
  at::parallel_for(0, m, 4096, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> line_buf(line_size, -1);
    int32_t* line = line_buf.data() + margin;
    std::vector<int32_t> run_buf;  // the run's table rows, when they go to rows in a given order
    Coord c0{};                    // the run's output coordinates but the last, and its batch
    int64_t b0 = 0, grid_row = -1;
    for (int64_t run0 = begin; run0 < end;) {
      int64_t run1 = run0 + 1, row_key = 0;
      if (coords) {  // rows in increasing order: the coordinates are read in order too
        const int32_t* r0 = coords + run0 * (ndim + 1);
        auto same_row = [&](const int32_t* a) {
          for (int d = 0; d < ndim; ++d)  // batch and all dimensions but the last
            if (a[d] != r0[d]) return false;
          return true;
        };
        while (run1 < end && same_row(coords + run1 * (ndim + 1))) ++run1;
        b0 = r0[0];
        for (int d = 0; d < last; ++d) c0[d] = r0[1 + d];
        row_key = out_keys[run0] - r0[ndim];
      } else {  // from the keys: one division per run, and the row coordinates carried from the last run
        const int64_t next_row = out_keys[run0] / x_out;
        row_key = next_row * x_out;
        while (run1 < end && out_keys[run1] < row_key + x_out) ++run1;
        const int64_t step = next_row - grid_row;
        if (grid_row >= 0 && last > 0 && c0[last - 1] + step < g.out_shape[last - 1]) {
          c0[last - 1] += step;  // same plane (batch and all dimensions but the last two)
        } else {
          int64_t rest = next_row;
          for (int d = last - 1; d >= 0; --d) {
            c0[d] = rest % g.out_shape[d];
            rest /= g.out_shape[d];
          }
          b0 = rest;
        }
        grid_row = next_row;
      }
      const int64_t run_len = run1 - run0;
      int32_t* cells0 = nbr + run0 * kv;
      if (order) {
        if (static_cast<int64_t>(run_buf.size()) < run_len * kv) run_buf.resize(run_len * kv);
        cells0 = run_buf.data();
      }
      std::fill_n(cells0, run_len * kv, -1);
      Coord origin{};  // non-transposed: the input row coordinates of tap row 0, per dimension
      uint64_t base = uint64_t(b0) * uint64_t(batch_rows);
      for (int d = 0; d < last; ++d) {
        origin[d] = c0[d] * g.stride[d] - g.padding[d];
        base += uint64_t(origin[d]) * uint64_t(row_stride[d]);
      }
      for (int64_t t = 0; t < tap_rows; ++t) {
        const int64_t row0 = t * k_last;
        int64_t r;
        bool inside = true;
        if (kTransposed) {
          r = b0;
          for (int d = 0; d < last; ++d) {
            const int64_t x = input_coord(g, true, d, c0[d], g.offsets[row0][d]);
            inside &= x >= 0;
            r = r * g.in_shape[d] + x;
          }
        } else {
          for (int d = 0; d < last; ++d) {
            const int64_t x = origin[d] + g.offsets[row0][d] * g.dilation[d];
            inside &= (x >= 0) & (x < g.in_shape[d]);
          }
          r = static_cast<int64_t>(base + uint64_t(row_delta[t]));
        }
        if (!inside) continue;
        const int32_t lo = start[r], hi = start[r + 1];
        if (lo == hi) continue;  // no input in that row: the cells stay -1
        for (int32_t q = lo; q < hi; ++q) line[xs[q]] = rows[q];
        for (int64_t o = run0; o < run1; ++o) {
          const int64_t y = out_keys[o] - row_key;
          int32_t* cells = cells0 + (o - run0) * kv + row0;
          if (kTransposed) {
            for (int64_t rl = 0; rl < k_last; ++rl) {
              const int64_t x = input_coord(g, true, last, y, rl);
              cells[rl] = x >= 0 ? line[x] : -1;
            }
          } else if (k_last == 3 && d_last == 1) {  // the common 3-wide kernel: three plain copies
            const int32_t* window = line + (y * s_last - p_last);
            cells[0] = window[0];
            cells[1] = window[1];
            cells[2] = window[2];
          } else {
            const int32_t* window = line + (y * s_last - p_last);
            for (int64_t rl = 0; rl < k_last; ++rl) cells[rl] = window[rl * d_last];
          }
        }
        for (int32_t q = lo; q < hi; ++q) line[xs[q]] = -1;
      }
      if (order)
        for (int64_t o = run0; o < run1; ++o)
          std::copy_n(cells0 + (o - run0) * kv, kv, nbr + int64_t(order[o]) * kv);
      run0 = run1;
    }
  });
}

void merge_rows(const ConvGeometry& g, bool transposed, const SortedSites& in, const RowIndex& ri, int64_t m,
                const int64_t* out_keys, const int32_t* coords, const int32_t* order, int32_t* nbr) {
  if (transposed) {
    merge_rows<true>(g, in, ri, m, out_keys, coords, order, nbr);
  } else {
    merge_rows<false>(g, in, ri, m, out_keys, coords, order, nbr);
  }
}

// SubM: out sites == in sites; nbr[j, r] = row of site (y - pad + r * dil) with pad = (k // 2) * dil.
at::Tensor build_subm_map(const at::Tensor& indices_in, int64_t batch_size, at::IntArrayRef spatial_shape,
                          at::IntArrayRef ksize, at::IntArrayRef dilation) {
  const int ndim = static_cast<int>(spatial_shape.size());
  check_geometry("build_subm_map", ndim, batch_size, spatial_shape, spatial_shape, ksize, {}, {}, dilation, false, true);
  const at::Tensor indices = check_indices(indices_in, ndim, batch_size, spatial_shape, "build_subm_map", "spatial_shape");
  std::vector<int64_t> ones(ndim, 1), pad(ndim);
  for (int d = 0; d < ndim; ++d) pad[d] = (ksize[d] / 2) * dilation[d];
  ConvGeometry g(ndim, spatial_shape, spatial_shape, ksize, ones, pad, dilation);
  SortedSites in = sort_sites(indices, g.in_shape, ndim, batch_size);
  at::Tensor nbr = new_table(indices.size(0), g.kernel_volume, indices.options());
  RowIndex ri;
  if (fits_dense_line(g, false, indices.size(0)) && build_row_index(in, g.in_shape, ndim, batch_size, &ri)) {
    // sites that came sorted are read in order; others through the sort's order, from their keys
    merge_rows(g, false, in, ri, indices.size(0), in.keys.data(), in.presorted ? indices.data_ptr<int32_t>() : nullptr,
               in.presorted ? nullptr : in.rows.data(), nbr.data_ptr<int32_t>());
  } else {
    merge_taps(g, false, in, in.keys, in.rows.data(), nbr.data_ptr<int32_t>());
  }
  return nbr;
}

// 64-bit popcount; with the POPCNT instruction where the CPU has it (the build targets baseline x86-64)
// (one dispatch per block of words, not per word)
inline int64_t count_bits_sw(const uint64_t* w, int64_t n) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += __builtin_popcountll(w[i]);
  return c;
}
#if defined(__GNUC__) && defined(__x86_64__)
__attribute__((target("popcnt"))) int64_t count_bits_hw(const uint64_t* w, int64_t n) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += __builtin_popcountll(w[i]);
  return c;
}
int64_t count_bits(const uint64_t* w, int64_t n) {
  static const bool has = __builtin_cpu_supports("popcnt");
  return has ? count_bits_hw(w, n) : count_bits_sw(w, n);
}
#else
inline int64_t count_bits(const uint64_t* w, int64_t n) { return count_bits_sw(w, n); }
#endif

int64_t gcd64(int64_t a, int64_t b) { return b == 0 ? a : gcd64(b, a % b); }

// Regular (strided) or transposed conv: output sites are every site some input reaches, sorted by
// (batch, coordinate); returns (out_indices [M, 1+D], nbr [M, K]).
std::tuple<at::Tensor, at::Tensor> build_conv_map(const at::Tensor& indices_in, int64_t batch_size,
                                                  at::IntArrayRef in_shape, at::IntArrayRef out_shape,
                                                  at::IntArrayRef ksize, at::IntArrayRef stride,
                                                  at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed) {
  const int ndim = static_cast<int>(in_shape.size());
  check_geometry("build_conv_map", ndim, batch_size, in_shape, out_shape, ksize, stride, padding, dilation, transposed,
                 false);
  const at::Tensor indices = check_indices(indices_in, ndim, batch_size, in_shape, "build_conv_map", "in_shape");
  ConvGeometry g(ndim, in_shape, out_shape, ksize, stride, padding, dilation);
  const int64_t n = indices.size(0);
  SortedSites in = sort_sites(indices, g.in_shape, ndim, batch_size);

  // every output key any input reaches, per thread, then one sort-unique. Per dimension d and input
  // coordinate x, reach[d][x * k_d ...] lists the key contributions y * out_stride[d] of the outputs that x
  // reaches (-1 ends a list): built once per call, so the per-site loop has no divisions.
  Coord out_stride{};
  int64_t out_volume = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    out_stride[d] = out_volume;
    out_volume *= g.out_shape[d];
  }
  // reach_of(d, x, list): the key contributions of the outputs x reaches along d, -1 after the last
  auto reach_of = [&](int d, int64_t x, int64_t* list) {
    const int64_t k = g.ksize[d];
    int64_t* p = list;
    for (int64_t rd = 0; rd < k; ++rd) {
      int64_t y;
      if (transposed) {
        y = x * g.stride[d] - g.padding[d] + rd * g.dilation[d];
      } else {
        const int64_t t = x + g.padding[d] - rd * g.dilation[d];
        if (t < 0 || t % g.stride[d] != 0) continue;
        y = t / g.stride[d];
      }
      if (y >= 0 && y < g.out_shape[d]) *p++ = y * out_stride[d];
    }
    for (; p < list + k; ++p) *p = -1;
  };
  std::array<std::vector<int64_t>, kMaxDim> reach;  // empty for a dimension too long for a table
  for (int d = 0; d < ndim; ++d) {
    if (g.in_shape[d] * g.ksize[d] > (int64_t(1) << 20)) continue;
    reach[d].resize(g.in_shape[d] * g.ksize[d]);
    for (int64_t x = 0; x < g.in_shape[d]; ++x) reach_of(d, x, reach[d].data() + x * g.ksize[d]);
  }
  // calls emit(key) for every output key the input site (batch, c) reaches (cartesian product of the
  // per-dimension lists)
  auto for_each_reached = [&](int64_t batch, const Coord& c, std::array<std::vector<int64_t>, kMaxDim>& local,
                              auto&& emit) {
    const int64_t* lists[kMaxDim] = {};
    bool any = true;
    for (int d = 0; d < ndim; ++d) {
      if (reach[d].empty()) {
        reach_of(d, c[d], local[d].data());
        lists[d] = local[d].data();
      } else {
        lists[d] = reach[d].data() + c[d] * g.ksize[d];
      }
      any &= lists[d][0] >= 0;
    }
    if (!any) return;
    const int64_t base = batch * out_volume;
    std::array<int64_t, kMaxDim> digit{};  // odometer over ndim <= 4 digits
    while (true) {
      int64_t key = base;
      for (int d = 0; d < ndim; ++d) key += lists[d][digit[d]];
      emit(key);
      int d = ndim - 1;
      while (d >= 0 && (++digit[d] == g.ksize[d] || lists[d][digit[d]] < 0)) digit[d--] = 0;
      if (d < 0) break;
    }
  };
  // calls fn(batch, coordinates) for the sorted sites begin..end-1, decoded from their sorted keys (sequential
  // reads, where the rows of unsorted indices would be read at random): one decode per grid row
  auto for_sorted_sites = [&](int64_t begin, int64_t end, auto&& fn) {
    const int64_t x_in = g.in_shape[ndim - 1];
    int64_t row_key = 0, row_end = -1, b = 0;
    Coord c{};
    for (int64_t i = begin; i < end; ++i) {
      const int64_t key = in.keys[i];
      if (key >= row_end) {
        decode_key(key, g.in_shape, ndim, &b, &c);
        row_key = key - c[ndim - 1];
        row_end = row_key + x_in;
      }
      c[ndim - 1] = key - row_key;
      fn(b, c);
    }
  };
  auto make_local = [&] {
    std::array<std::vector<int64_t>, kMaxDim> local;
    for (int d = 0; d < ndim; ++d)
      if (reach[d].empty()) local[d].resize(g.ksize[d]);
    return local;
  };
  std::vector<int64_t> keys;
  const int64_t words = (max_key(batch_size, g.out_shape, ndim) + 64) / 64;
  if (words <= std::max<int64_t>(int64_t(1) << 16, 16 * n)) {  // scanning stays cheaper than sorting
    // the output grid as a bitmap: set every reached bit (in parallel), then read the set bits in order.
    // Each thread sets bits in a bitmap of its own (no atomics) while they all fit in 32 MB; the copies are
    // OR-ed together while the bits are counted.
    const int64_t threads = at::get_num_threads();
    const int64_t copies = threads > 1 && threads * words <= (int64_t(1) << 22) ? threads : 1;
    std::vector<uint64_t> bitmap(words * copies, 0);
    uint64_t* bm = bitmap.data();
    // Sites are visited in key order, so that the bits they set lie close together.
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      auto local = make_local();
      if (copies > 1 || threads == 1) {  // a bitmap per thread, or one thread: no atomics
        uint64_t* mine = bm + (copies > 1 ? at::get_thread_num() * words : 0);
        for_sorted_sites(begin, end, [&](int64_t b, const Coord& c) {
          for_each_reached(b, c, local, [&](int64_t key) { mine[key >> 6] |= uint64_t(1) << (key & 63); });
        });
      } else {
        for_sorted_sites(begin, end, [&](int64_t b, const Coord& c) {
          for_each_reached(b, c, local, [&](int64_t key) {
            const uint64_t bit = uint64_t(1) << (key & 63);
            if (!(__atomic_load_n(bm + (key >> 6), __ATOMIC_RELAXED) & bit))
              __atomic_fetch_or(bm + (key >> 6), bit, __ATOMIC_RELAXED);
          });
        });
      }
    });
    constexpr int64_t kBlock = 8192;  // words per block
    const int64_t blocks = (words + kBlock - 1) / kBlock;
    std::vector<int64_t> offset(blocks + 1, 0);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t w0 = blk * kBlock, w1 = std::min(words, w0 + kBlock);
        for (int64_t t = 1; t < copies; ++t) {
          const uint64_t* other = bm + t * words;
          for (int64_t w = w0; w < w1; ++w) bm[w] |= other[w];
        }
        offset[blk + 1] = count_bits(bm + w0, w1 - w0);
      }
    });
    for (int64_t blk = 0; blk < blocks; ++blk) offset[blk + 1] += offset[blk];
    keys.resize(offset[blocks]);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        int64_t pos = offset[blk];
        for (int64_t w = blk * kBlock; w < std::min(words, (blk + 1) * kBlock); ++w)
          for (uint64_t x = bm[w]; x; x &= x - 1) keys[pos++] = w * 64 + __builtin_ctzll(x);
      }
    });
  } else {
    // grids too large for a bitmap: collect the keys per thread, then one sort-unique
    std::vector<std::vector<int64_t>> found(at::get_num_threads());
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      std::vector<int64_t>& out = found[at::get_thread_num()];
      auto local = make_local();
      for_sorted_sites(begin, end, [&](int64_t b, const Coord& c) {
        for_each_reached(b, c, local, [&](int64_t key) { out.push_back(key); });
      });
    });
    size_t total = 0;
    for (auto& f : found) total += f.size();
    keys.reserve(total);
    for (auto& f : found) {
      keys.insert(keys.end(), f.begin(), f.end());
      std::vector<int64_t>().swap(f);
    }
    std::vector<int32_t> no_vals;
    radix_sort(keys, no_vals, max_key(batch_size, g.out_shape, ndim));
    keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  }
  const int64_t m = static_cast<int64_t>(keys.size());
  TORCH_CHECK_VALUE(m < (int64_t(1) << 31), "spconv: more than 2^31-1 output sites");

  at::Tensor out_indices = at::empty({m, ndim + 1}, indices.options());
  int32_t* oidx = out_indices.data_ptr<int32_t>();
  const int64_t x_size = g.out_shape[ndim - 1];
  at::parallel_for(0, m, 16384, [&](int64_t begin, int64_t end) {
    int64_t row_begin = -1, row_end = -1;  // keys are sorted: decode the row only when it changes
    int64_t b = 0;
    Coord y{};
    for (int64_t j = begin; j < end; ++j) {
      if (keys[j] >= row_end) {
        decode_key(keys[j], g.out_shape, ndim, &b, &y);
        row_begin = keys[j] - y[ndim - 1];
        row_end = row_begin + x_size;
      }
      int32_t* o = oidx + j * (ndim + 1);
      o[0] = static_cast<int32_t>(b);
      for (int d = 0; d < ndim - 1; ++d) o[1 + d] = static_cast<int32_t>(y[d]);
      o[ndim] = static_cast<int32_t>(keys[j] - row_begin);
    }
  });
  at::Tensor nbr = new_table(m, g.kernel_volume, indices.options());
  RowIndex ri;
  if (fits_dense_line(g, transposed, std::max(n, m)) && build_row_index(in, g.in_shape, ndim, batch_size, &ri)) {
    merge_rows(g, transposed, in, ri, m, keys.data(), oidx, nullptr, nbr.data_ptr<int32_t>());
  } else {
    merge_taps(g, transposed, in, keys, nullptr, nbr.data_ptr<int32_t>());
  }
  return {out_indices, nbr};
}

// Input-major view of a map: nbr_in[i, r] = the output row that input i feeds through tap r, or -1.
at::Tensor invert_map(const at::Tensor& nbr_in, int64_t num_inputs) {
  const at::Tensor nbr = check_int32_2d(nbr_in, "invert_map", "nbr");
  TORCH_CHECK_VALUE(num_inputs >= 0 && num_inputs <= kInt32Max, "spconv.invert_map: num_inputs must be in [0, 2^31-1], got ",
                    num_inputs);
  check_entries(nbr, -1, num_inputs, "invert_map", "nbr",
                "-1 (no input) or an input row below num_inputs=" + std::to_string(num_inputs) +
                    "; pass the number of input sites the map was built for");
  const int64_t m = nbr.size(0), kv = nbr.size(1);
  at::Tensor inv = at::full({num_inputs, kv}, -1, nbr.options());
  const int32_t* src = nbr.data_ptr<int32_t>();
  int32_t* dst = inv.data_ptr<int32_t>();
  at::parallel_for(0, m, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t r = 0; r < kv; ++r) {
        int32_t i = src[j * kv + r];
        if (i >= 0) dst[int64_t(i) * kv + r] = static_cast<int32_t>(j);
      }
    }
  });
  return inv;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spconv, m) {
  m.def("build_subm_map(Tensor indices, int batch_size, int[] spatial_shape, int[] ksize, int[] dilation) -> Tensor");
  m.def(
      "build_conv_map(Tensor indices, int batch_size, int[] in_shape, int[] out_shape, int[] ksize, int[] stride, "
      "int[] padding, int[] dilation, bool transposed) -> (Tensor, Tensor)");
  m.def("invert_map(Tensor nbr, int num_inputs) -> Tensor");
}

TORCH_LIBRARY_IMPL(spconv, CPU, m) {
  m.impl("build_subm_map", &build_subm_map);
  m.impl("build_conv_map", &build_conv_map);
  m.impl("invert_map", &invert_map);
}

}  // namespace spconv
