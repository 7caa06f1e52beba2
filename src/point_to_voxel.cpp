// Point cloud -> voxels on the CPU (spconv's PointToVoxel / Point2VoxelCPU semantics).
//
// Result, as spconv 2.3.8's CPU build gives it:
//   - a point's cell is c_j = floor((p[ndim-1-j] - coors_range[j]) / vsize[j]) (ZYX), computed in the
//     points' precision with float32 range/size constants (float32 points: float32 arithmetic);
//     points with any c_j outside [0, grid_size[j]) are dropped (pc_voxel_id -1). NaN/inf
//     coordinates are dropped as well and counted (num_invalid).
//   - voxels are numbered in order of first appearance in the input; voxels past max_num_voxels
//     are dropped (their points get -1).
//   - each voxel stores its first max_num_points_per_voxel points in input order; later points
//     still get the voxel's id in pc_voxel_id.
//   - empty_mean fills the unused slots of a voxel with the mean of its stored points (spconv's
//     CPU code reads a cleared buffer there and mixes in the previous voxel's mean; we do not).
//
// Up to two threads, or fewer than 32768 points: a single scan does what spconv's loop does, with
// an int64-keyed hash in place of its dense grid (numbering voxels as they first appear), then the
// outputs are filled in parallel.
//
// Three or more threads: parallel and deterministic (bitwise the result of the scan), in regions
// over fixed chunks of points:
//   1. cell keys of all points (int64, row-major ZYX) and their hash partition (one per thread);
//      then each partition's keys are gathered, in input order, into its own range of
//      "positions" (per-point arrays are indexed by position, so threads never share cache lines);
//   2. one thread per partition inserts its keys, in input order, into its own open-addressing
//      table: a cell's first point and the order of its points come out as in a sequential scan,
//      without atomics;
//   3. a prefix count of first points over the chunks numbers the voxels by first appearance;
//      each first point writes its voxel's indices, point count and zero padding;
//   4. every stored point copies itself into its voxel slot and writes its pc_voxel_id.
// (empty_mean adds one more, per voxel.) No dense grid: memory is O(points), whatever the range.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

#include "spconv/geometry.h"
#include "spconv/hash_mix.h"

namespace spconv {
namespace {

struct Slot {
  int64_t key;       // cell key, -1 when empty
  int32_t count;     // points seen so far in this cell
  int32_t aux;       // partitioned: position of the cell's first point; serial: voxel id (-1: over the cap)
};

struct Meta {
  int ndim;
  float vsize[kMaxDim];
  float lo[kMaxDim];
  int64_t grid[kMaxDim];
  int64_t stride[kMaxDim];
};

int64_t next_pow2(int64_t v) {
  int64_t c = 16;
  while (c < v) c <<= 1;
  return c;
}

template <typename T>
std::unique_ptr<T[]> uninit(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(std::max<int64_t>(n, 1))]);
}

// Which of `parts` partitions a hash belongs to.
inline int64_t part_of(uint64_t h, int64_t parts) {
  return static_cast<int64_t>(((h >> 32) * static_cast<uint64_t>(parts)) >> 32);
}

constexpr int64_t kChunk = 8192;  // fixed point chunks: the numbering does not depend on threads

// Cell key of a point, -1 when it is dropped. No floor needed: floor(t) is in [0, grid) exactly when
// t is, and then floor(t) == trunc(t); NaN fails both comparisons; -0.0 gives cell 0, as floor
// does. lo/vs are the float32 constants in the points' precision T, as spconv computes.
template <typename T>
inline int64_t cell_key(const T* p, const Meta& m, const T* lo, const T* vs, bool* finite) {
  int64_t key = 0;
  bool ok = true, fin = true;
  for (int j = 0; j < m.ndim; ++j) {
    const T v = p[m.ndim - 1 - j];
    fin &= std::isfinite(v);
    const T t = (v - lo[j]) / vs[j];
    ok &= t >= T(0) && static_cast<double>(t) < static_cast<double>(m.grid[j]);
    key += ok ? static_cast<int64_t>(t) * m.stride[j] : 0;
  }
  *finite = fin;
  return ok ? key : -1;
}

template <typename T>
void constants(const Meta& m, T* lo, T* vs) {
  for (int j = 0; j < m.ndim; ++j) {
    lo[j] = static_cast<T>(m.lo[j]);
    vs[j] = static_cast<T>(m.vsize[j]);
  }
}

// Voxel indices (ZYX) of a key.
inline void decode_key(uint64_t key, const Meta& m, int32_t* out) {
  for (int j = 0; j < m.ndim - 1; ++j) {
    const uint64_t st = static_cast<uint64_t>(m.stride[j]);
    const uint64_t q = ((key | st) >> 32) == 0 ? uint32_t(key) / uint32_t(st) : key / st;  // 32-bit div
    out[j] = static_cast<int32_t>(q);
    key -= q * st;
  }
  out[m.ndim - 1] = static_cast<int32_t>(key);
}

// Region 1 of the partitioned path: cell key of every point (-1 when dropped), its partition, and
// points per (chunk, partition); returns the number of points with a non-finite coordinate.
template <typename T>
int64_t compute_keys(const T* pts, int64_t n, int64_t f, const Meta& m, int64_t parts, int64_t* keys,
                     uint8_t* part, int64_t* chunk_points) {
  std::atomic<int64_t> invalid{0};
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t cbegin, int64_t cend) {
    T lo[kMaxDim], vs[kMaxDim];
    constants(m, lo, vs);
    int64_t local_invalid = 0;
    std::vector<int64_t> counts(parts);
    for (int64_t c = cbegin; c < cend; ++c) {
      std::fill(counts.begin(), counts.end(), 0);
      for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) {
        bool finite;
        const int64_t key = cell_key(pts + i * f, m, lo, vs, &finite);
        keys[i] = key;
        local_invalid += !finite;
        if (key >= 0) {
          int64_t t = 0;
          if (parts > 1) {
            t = part_of(mix64(key), parts);
            part[i] = static_cast<uint8_t>(t);
          }
          ++counts[t];
        }
      }
      std::copy(counts.begin(), counts.end(), chunk_points + c * parts);
    }
    invalid.fetch_add(local_invalid, std::memory_order_relaxed);
  });
  return invalid.load();
}

// The serial scan (spconv's loop with a hash): pc_voxel_id and the in-voxel slot of every point,
// the key and point count of every voxel; returns (number of voxels, non-finite points).
template <typename T>
std::pair<int64_t, int64_t> serial_scan(const T* pts, int64_t n, int64_t f, const Meta& m, int64_t max_voxels,
                                        int64_t* pvid, int32_t* pslot, int64_t* vkey, int32_t* vcount) {
  const int64_t cap = next_pow2(n + n / 4 + 1);  // load factor <= 0.8
  const int64_t msk = cap - 1;
  auto tab = uninit<Slot>(cap);
  std::fill(tab.get(), tab.get() + cap, Slot{-1, 0, -1});
  T lo[kMaxDim], vs[kMaxDim];
  constants(m, lo, vs);
  constexpr int64_t kBlock = 256, kAhead = 16;
  int64_t bkeys[kBlock];
  int64_t nvox = 0, invalid = 0, last_key = -1;
  Slot* last = nullptr;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t bn = std::min(kBlock, n - b);
    for (int64_t j = 0; j < bn; ++j) {
      bool finite;
      bkeys[j] = cell_key(pts + (b + j) * f, m, lo, vs, &finite);
      invalid += !finite;
    }
    for (int64_t j = 0; j < bn; ++j) {
      if (j + kAhead < bn && bkeys[j + kAhead] >= 0) {  // the table is bigger than L2: prefetch
        __builtin_prefetch(tab.get() + (mix64(bkeys[j + kAhead]) & msk), 1);
      }
      const int64_t key = bkeys[j], i = b + j;
      if (key < 0) {
        pvid[i] = -1;
        continue;
      }
      if (key != last_key) {  // consecutive points often share a cell
        int64_t s = mix64(key) & msk;
        while (tab[s].key != key && tab[s].key != -1) s = (s + 1) & msk;
        last = tab.get() + s;
        last_key = key;
        if (last->key == -1) {
          last->key = key;
          if (nvox < max_voxels) {
            last->aux = static_cast<int32_t>(nvox);
            vkey[nvox] = key;
            vcount[nvox] = 0;
            ++nvox;
          }
        }
      }
      const int32_t vid = last->aux;
      pvid[i] = vid;
      if (vid >= 0) pslot[i] = vcount[vid]++;
    }
  }
  return {nvox, invalid};
}

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t>;

// The partitioned path (several threads): see the top of the file.
Result partitioned_path(const at::Tensor& points, const Meta& m, int64_t max_num_voxels, int64_t maxp,
                        bool empty_mean, int64_t parts) {
  const int64_t n = points.size(0), f = points.size(1);
  const int ndim = m.ndim;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;

  // 1. cell keys and partitions
  auto keys = uninit<int64_t>(n);
  auto part = uninit<uint8_t>(parts > 1 ? n : 1);
  std::vector<int64_t> chunk_points(nchunks * parts, 0);  // valid points per (chunk, partition)
  const int64_t num_invalid =
      points.scalar_type() == at::kFloat
          ? compute_keys(points.data_ptr<float>(), n, f, m, parts, keys.get(), part.get(), chunk_points.data())
          : compute_keys(points.data_ptr<double>(), n, f, m, parts, keys.get(), part.get(), chunk_points.data());
  auto part_at = [&](int64_t i) -> int64_t { return parts == 1 ? 0 : part[i]; };

  // Positions: partition t's points occupy [pos_begin[t], pos_begin[t+1]) of the per-point arrays,
  // in input order; chunk c's points of partition t start at chunk_pos[c * parts + t].
  std::vector<int64_t> pos_begin(parts + 1, 0), chunk_pos(nchunks * parts);
  for (int64_t t = 0; t < parts; ++t) {
    int64_t total = 0;
    for (int64_t c = 0; c < nchunks; ++c) total += chunk_points[c * parts + t];
    pos_begin[t + 1] = pos_begin[t] + total;
  }
  for (int64_t t = 0; t < parts; ++t) {
    int64_t pos = pos_begin[t];
    for (int64_t c = 0; c < nchunks; ++c) {
      chunk_pos[c * parts + t] = pos;
      pos += chunk_points[c * parts + t];
    }
  }
  const int64_t nvalid = pos_begin[parts];

  // 2. partitioned insertion
  std::vector<int64_t> offset(parts + 1, 0), mask(parts);
  for (int64_t t = 0; t < parts; ++t) {
    // load factor <= 0.8 even if every point had its own cell; about 0.45 for LiDAR scans
    const int64_t np = pos_begin[t + 1] - pos_begin[t];
    const int64_t cap = next_pow2(np + np / 4 + 1);
    mask[t] = cap - 1;
    offset[t + 1] = offset[t] + cap;
  }
  auto table = uninit<Slot>(offset[parts]);
  auto pslot = uninit<int32_t>(nvalid);       // position of the point among its cell's points
  auto firstpos = uninit<int32_t>(nvalid);    // position of the cell's first point
  auto cell_count = uninit<int32_t>(nvalid);  // at first points: the cell's number of points
  auto rank = uninit<int32_t>(nvalid);        // at first points: voxel row, -1 past the cap
  std::vector<int64_t> chunk_new(nchunks * parts, 0);  // new cells per (chunk, partition)
  // keys in position order: each partition's keys, in input order, side by side
  auto pkey = uninit<int64_t>(nvalid);
  at::parallel_for(0, nchunks, 1, [&](int64_t cbegin, int64_t cend) {
    std::vector<int64_t> ctr(parts);
    for (int64_t c = cbegin; c < cend; ++c) {
      std::copy(chunk_pos.begin() + c * parts, chunk_pos.begin() + (c + 1) * parts, ctr.begin());
      for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) {
        if (keys[i] >= 0) pkey[ctr[part_at(i)]++] = keys[i];
      }
    }
  });
  at::parallel_for(0, parts, 1, [&](int64_t pbegin, int64_t pend) {
    for (int64_t t = pbegin; t < pend; ++t) {
      Slot* tab = table.get() + offset[t];
      const int64_t msk = mask[t];
      std::fill(tab, tab + msk + 1, Slot{-1, 0, 0});
      std::vector<int64_t> news(nchunks, 0);  // new cells per chunk (thread-local: no false sharing)
      constexpr int64_t kAhead = 16;
      const int64_t end = pos_begin[t + 1];
      int64_t c = 0;  // chunk of the current point
      auto chunk_end = [&](int64_t cc) { return cc + 1 < nchunks ? chunk_pos[(cc + 1) * parts + t] : end; };
      int64_t next = chunk_end(0);
      int64_t last_key = -1;
      Slot* last = nullptr;
      for (int64_t pos = pos_begin[t]; pos < end; ++pos) {
        while (pos >= next) next = chunk_end(++c);
        if (pos + kAhead < end) __builtin_prefetch(tab + (mix64(pkey[pos + kAhead]) & msk), 1);  // table > L2
        const int64_t key = pkey[pos];
        Slot* slot = last;
        if (key != last_key) {  // consecutive points often share a cell
          int64_t s = mix64(key) & msk;
          while (tab[s].key != key && tab[s].key != -1) s = (s + 1) & msk;
          slot = tab + s;
          if (slot->key == -1) {
            slot->key = key;
            slot->aux = static_cast<int32_t>(pos);
            ++news[c];
          }
          last_key = key;
          last = slot;
        }
        pslot[pos] = slot->count++;
        firstpos[pos] = slot->aux;
        cell_count[slot->aux] = slot->count;  // the cell's first point is recent: cached
      }
      for (int64_t cc = 0; cc < nchunks; ++cc) chunk_new[cc * parts + t] = news[cc];
    }
  });

  // 3. number the cells by first appearance; the first point of each kept voxel writes its
  // indices, point count and the zero padding
  std::vector<int64_t> chunk_start(nchunks + 1, 0);
  for (int64_t c = 0; c < nchunks; ++c) {
    int64_t cnt = 0;
    for (int64_t t = 0; t < parts; ++t) cnt += chunk_new[c * parts + t];
    chunk_start[c + 1] = chunk_start[c] + cnt;
  }
  const int64_t nvox = std::min<int64_t>(chunk_start[nchunks], max_num_voxels);
  at::Tensor num_per_voxel = at::empty({nvox}, points.options().dtype(at::kInt));
  at::Tensor indices = at::empty({nvox, ndim}, points.options().dtype(at::kInt));
  at::Tensor voxels = at::empty({nvox, maxp, f}, points.options().dtype(at::kFloat));
  at::Tensor pc_voxel_id = at::empty({n}, points.options().dtype(at::kLong));
  int32_t* npv = num_per_voxel.data_ptr<int32_t>();
  int32_t* idx = indices.data_ptr<int32_t>();
  float* vox = voxels.data_ptr<float>();
  int64_t* pvid = pc_voxel_id.data_ptr<int64_t>();
  at::parallel_for(0, nchunks, 1, [&](int64_t cbegin, int64_t cend) {
    std::vector<int64_t> ctr(parts);
    for (int64_t c = cbegin; c < cend; ++c) {
      std::copy(chunk_pos.begin() + c * parts, chunk_pos.begin() + (c + 1) * parts, ctr.begin());
      int64_t r = chunk_start[c];
      for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) {
        if (keys[i] < 0) continue;
        const int64_t pos = ctr[part_at(i)]++;
        if (pslot[pos] != 0) continue;
        if (r >= nvox) {
          rank[pos] = -1;
          continue;
        }
        rank[pos] = static_cast<int32_t>(r);
        const int64_t num = std::min<int64_t>(cell_count[pos], maxp);
        npv[r] = static_cast<int32_t>(num);
        decode_key(static_cast<uint64_t>(keys[i]), m, idx + r * ndim);
        if (!empty_mean) std::fill(vox + (r * maxp + num) * f, vox + (r + 1) * maxp * f, 0.f);
        ++r;
      }
    }
  });

  // 4. per point: its voxel id, and its row in the voxel when among the first maxp
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "point_to_voxel", [&] {
    const scalar_t* pts = points.data_ptr<scalar_t>();
    at::parallel_for(0, nchunks, 1, [&](int64_t cbegin, int64_t cend) {
      std::vector<int64_t> ctr(parts);
      for (int64_t c = cbegin; c < cend; ++c) {
        std::copy(chunk_pos.begin() + c * parts, chunk_pos.begin() + (c + 1) * parts, ctr.begin());
        for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) {
          if (keys[i] < 0) {
            pvid[i] = -1;
            continue;
          }
          const int64_t pos = ctr[part_at(i)]++;
          const int64_t vid = rank[firstpos[pos]];
          pvid[i] = vid;
          if (vid < 0 || pslot[pos] >= maxp) continue;
          const scalar_t* p = pts + i * f;
          float* out = vox + (vid * maxp + pslot[pos]) * f;
          for (int64_t k = 0; k < f; ++k) out[k] = static_cast<float>(p[k]);
        }
      }
    });
  });

  return {voxels, indices, num_per_voxel, pc_voxel_id, num_invalid};
}

// The serial path: one scan, then the outputs in parallel.
Result serial_path(const at::Tensor& points, const Meta& m, int64_t max_num_voxels, int64_t maxp,
                   bool empty_mean) {
  const int64_t n = points.size(0), f = points.size(1);
  const int ndim = m.ndim;
  at::Tensor pc_voxel_id = at::empty({n}, points.options().dtype(at::kLong));
  int64_t* pvid = pc_voxel_id.data_ptr<int64_t>();
  auto pslot = uninit<int32_t>(n);
  const int64_t vcap = std::min(n, max_num_voxels);
  auto vkey = uninit<int64_t>(vcap);
  auto vcount = uninit<int32_t>(vcap);
  const std::pair<int64_t, int64_t> scanned =
      points.scalar_type() == at::kFloat
          ? serial_scan(points.data_ptr<float>(), n, f, m, max_num_voxels, pvid, pslot.get(), vkey.get(), vcount.get())
          : serial_scan(points.data_ptr<double>(), n, f, m, max_num_voxels, pvid, pslot.get(), vkey.get(),
                        vcount.get());
  const int64_t nvox = scanned.first;
  at::Tensor num_per_voxel = at::empty({nvox}, points.options().dtype(at::kInt));
  at::Tensor indices = at::empty({nvox, ndim}, points.options().dtype(at::kInt));
  at::Tensor voxels = at::empty({nvox, maxp, f}, points.options().dtype(at::kFloat));
  int32_t* npv = num_per_voxel.data_ptr<int32_t>();
  int32_t* idx = indices.data_ptr<int32_t>();
  float* vox = voxels.data_ptr<float>();
  at::parallel_for(0, nvox, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) {
      const int64_t num = std::min<int64_t>(vcount[v], maxp);
      npv[v] = static_cast<int32_t>(num);
      decode_key(static_cast<uint64_t>(vkey[v]), m, idx + v * ndim);
      if (!empty_mean) std::fill(vox + (v * maxp + num) * f, vox + (v + 1) * maxp * f, 0.f);
    }
  });
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "point_to_voxel", [&] {
    const scalar_t* pts = points.data_ptr<scalar_t>();
    at::parallel_for(0, n, 8192, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t vid = pvid[i];
        if (vid < 0 || pslot[i] >= maxp) continue;
        const scalar_t* p = pts + i * f;
        float* out = vox + (vid * maxp + pslot[i]) * f;
        for (int64_t k = 0; k < f; ++k) out[k] = static_cast<float>(p[k]);
      }
    });
  });
  return {voxels, indices, num_per_voxel, pc_voxel_id, scanned.second};
}

// empty_mean: unused slots get the mean of the voxel's stored points (float32, in order).
void fill_mean(at::Tensor& voxels, const at::Tensor& num_per_voxel) {
  const int64_t nvox = voxels.size(0), maxp = voxels.size(1), f = voxels.size(2);
  float* vox = voxels.data_ptr<float>();
  const int32_t* npv = num_per_voxel.data_ptr<int32_t>();
  at::parallel_for(0, nvox, 1024, [&](int64_t begin, int64_t end) {
    std::vector<float> mean(f);
    for (int64_t v = begin; v < end; ++v) {
      const int64_t num = npv[v];  // >= 1: every voxel has its first point
      float* out = vox + v * maxp * f;
      std::fill(mean.begin(), mean.end(), 0.f);
      for (int64_t s = 0; s < num; ++s) {
        for (int64_t k = 0; k < f; ++k) mean[k] += out[s * f + k];
      }
      for (int64_t k = 0; k < f; ++k) mean[k] /= static_cast<float>(num);
      for (int64_t s = num; s < maxp; ++s) std::copy(mean.begin(), mean.end(), out + s * f);
    }
  });
}

Result point_to_voxel(
    const at::Tensor& points_in, at::ArrayRef<double> vsize, at::IntArrayRef grid_size,
    at::ArrayRef<double> coors_range, int64_t max_num_voxels, int64_t max_num_points_per_voxel, bool empty_mean) {
  const int ndim = static_cast<int>(vsize.size());
  TORCH_CHECK_VALUE(ndim >= 1 && ndim <= kMaxDim, "point_to_voxel: 1 to 4 axes are supported, got ", ndim);
  TORCH_CHECK_VALUE(static_cast<int>(grid_size.size()) == ndim && static_cast<int>(coors_range.size()) == 2 * ndim,
                    "point_to_voxel: grid_size needs ", ndim, " and coors_range ", 2 * ndim, " entries");
  TORCH_CHECK_VALUE(points_in.device().is_cpu(), "point_to_voxel: points must be on the CPU, got ",
                    points_in.device());
  TORCH_CHECK_VALUE(points_in.scalar_type() == at::kFloat || points_in.scalar_type() == at::kDouble,
                    "point_to_voxel: points must be float32 or float64, got ", points_in.scalar_type());
  TORCH_CHECK_VALUE(points_in.dim() == 2 && points_in.size(1) >= ndim,
                    "point_to_voxel: points must be [N, F] with F >= ", ndim, ", got ", points_in.sizes());
  TORCH_CHECK_VALUE(max_num_voxels > 0 && max_num_points_per_voxel > 0,
                    "point_to_voxel: max_num_voxels and max_num_points_per_voxel must be positive");
  TORCH_CHECK_VALUE(points_in.size(0) < (int64_t(1) << 29), "point_to_voxel: at most 2^29 points per call");
  TORCH_CHECK_VALUE(max_num_points_per_voxel <= std::numeric_limits<int32_t>::max(),
                    "point_to_voxel: max_num_points_per_voxel must be at most 2^31-1, got ", max_num_points_per_voxel);
  {  // the voxels tensor [min(N, max_num_voxels), max_num_points_per_voxel, F] float32 must have a size
    const __int128 bytes = __int128(std::min<int64_t>(points_in.size(0), max_num_voxels)) * max_num_points_per_voxel *
                           points_in.size(1) * 4;
    TORCH_CHECK_VALUE(bytes < (__int128(1) << 62), "point_to_voxel: voxels of [", std::min<int64_t>(points_in.size(0), max_num_voxels),
                      ", ", max_num_points_per_voxel, ", ", points_in.size(1),
                      "] float32 would not fit in memory; lower max_num_points_per_voxel or max_num_voxels");
  }

  Meta m;
  m.ndim = ndim;
  int64_t prod = 1;
  for (int j = ndim - 1; j >= 0; --j) {
    m.vsize[j] = static_cast<float>(vsize[j]);
    m.lo[j] = static_cast<float>(coors_range[j]);
    m.grid[j] = grid_size[j];
    TORCH_CHECK_VALUE(m.vsize[j] > 0 && std::isfinite(m.vsize[j]) && std::isfinite(m.lo[j]),
                      "point_to_voxel: voxel sizes must be finite and > 0, range minimums finite");
    TORCH_CHECK_VALUE(grid_size[j] > 0 && grid_size[j] <= std::numeric_limits<int32_t>::max(),
                      "point_to_voxel: grid_size must be in [1, 2^31-1], got ", grid_size);
    m.stride[j] = prod;
    TORCH_CHECK_VALUE(prod <= (std::numeric_limits<int64_t>::max() / 4) / grid_size[j],
                      "point_to_voxel: grid ", grid_size, " has too many cells for int64 keys");
    prod *= grid_size[j];
  }

  const at::Tensor points = points_in.contiguous();
  const int64_t n = points.size(0);
  const int64_t maxp = max_num_points_per_voxel;
  // Partitions: one per thread when there is enough work to share (at most 255: ids are bytes).
  // With 2 threads the partitioned path measured no faster than the serial scan (whose output
  // filling is parallel too) on 2 cores, and it has more parallel regions to wait in when the
  // cores are shared, so it starts at 3 threads.
  const int64_t threads = at::get_num_threads();
  const int64_t parts =
      threads < 3 ? 1 : std::max<int64_t>(1, std::min<int64_t>({threads, n / 16384, int64_t(255)}));
  Result res = parts == 1 ? serial_path(points, m, max_num_voxels, maxp, empty_mean)
                          : partitioned_path(points, m, max_num_voxels, maxp, empty_mean, parts);
  if (empty_mean) fill_mean(std::get<0>(res), std::get<2>(res));
  return res;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spconv, m) {
  m.def(
      "point_to_voxel(Tensor points, float[] vsize, int[] grid_size, float[] coors_range, int max_num_voxels, "
      "int max_num_points_per_voxel, bool empty_mean) -> (Tensor voxels, Tensor indices, Tensor num_per_voxel, "
      "Tensor pc_voxel_id, int num_invalid)");
}

TORCH_LIBRARY_IMPL(spconv, CPU, m) { m.impl("point_to_voxel", &point_to_voxel); }

}  // namespace spconv
