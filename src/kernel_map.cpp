// Kernel-map building on the CPU: output-major neighbour tables nbr[out_row, tap] = input row or -1.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "spconv/geometry.h"
#include "spconv/hash_table.h"

namespace spconv {
namespace {

inline void read_coord(const int32_t* row, int ndim, int64_t* batch, Coord* c) {
  *batch = row[0];
  for (int d = 0; d < ndim; ++d) (*c)[d] = row[1 + d];
}

// Hash of the input sites keyed on (batch, coord) in the input grid; rejects duplicate sites.
CoordHashTable build_site_table(const at::Tensor& indices, const Coord& shape, int ndim) {
  const int64_t n = indices.size(0);
  const int32_t* idx = indices.data_ptr<int32_t>();
  CoordHashTable table(n);
  std::atomic<int64_t> duplicate_row{-1};
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t b;
      Coord c;
      read_coord(idx + i * (ndim + 1), ndim, &b, &c);
      bool inserted;
      int64_t slot = table.insert(linear_key(b, c, shape, ndim), &inserted);
      if (inserted) {
        table.set_value(slot, static_cast<int32_t>(i));
      } else {
        duplicate_row.store(i);
      }
    }
  });
  TORCH_CHECK_VALUE(duplicate_row.load() < 0, "spconv: indices contain duplicate sites (row ",
                    duplicate_row.load(),
                    " repeats an earlier (batch, coordinate)); merge duplicates first, e.g. with "
                    "torch.unique(indices, dim=0, return_inverse=True) and a scatter-add of the features");
  return table;
}

void check_indices(const at::Tensor& indices, int ndim) {
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(1) == ndim + 1 && indices.scalar_type() == at::kInt &&
                        indices.is_contiguous() && indices.device().is_cpu(),
                    "spconv: indices must be a contiguous CPU int32 tensor [N, ", ndim + 1, "]");
  TORCH_CHECK_VALUE(indices.size(0) < (int64_t(1) << 31), "spconv: at most 2^31-1 sites are supported");
}

// SubM: out sites == in sites; nbr[j, r] = row of site (y - pad + r * dil) with pad = (k // 2) * dil.
at::Tensor build_subm_map(const at::Tensor& indices, at::IntArrayRef spatial_shape, at::IntArrayRef ksize,
                          at::IntArrayRef dilation) {
  const int ndim = static_cast<int>(spatial_shape.size());
  check_indices(indices, ndim);
  std::vector<int64_t> ones(ndim, 1), pad(ndim);
  for (int d = 0; d < ndim; ++d) pad[d] = (ksize[d] / 2) * dilation[d];
  ConvGeometry g(ndim, spatial_shape, spatial_shape, ksize, ones, pad, dilation);
  const int64_t n = indices.size(0), kv = g.kernel_volume;
  CoordHashTable table = build_site_table(indices, g.in_shape, ndim);
  at::Tensor nbr = at::empty({n, kv}, indices.options());
  int32_t* out = nbr.data_ptr<int32_t>();
  const int32_t* idx = indices.data_ptr<int32_t>();
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      int64_t b;
      Coord y, x;
      read_coord(idx + j * (ndim + 1), ndim, &b, &y);
      for (int64_t r = 0; r < kv; ++r) {
        bool inside = true;
        for (int d = 0; d < ndim; ++d) {
          x[d] = y[d] - g.padding[d] + g.offsets[r][d] * g.dilation[d];
          inside &= (x[d] >= 0) & (x[d] < g.in_shape[d]);
        }
        out[j * kv + r] = inside ? table.find(linear_key(b, x, g.in_shape, ndim)) : -1;
      }
    }
  });
  return nbr;
}

// Output coordinate reached from input x through tap r, or false when there is none.
inline bool output_of(const ConvGeometry& g, bool transposed, const Coord& x, int64_t r, Coord* y) {
  for (int d = 0; d < g.ndim; ++d) {
    int64_t v;
    if (transposed) {
      v = x[d] * g.stride[d] - g.padding[d] + g.offsets[r][d] * g.dilation[d];
    } else {
      int64_t t = x[d] + g.padding[d] - g.offsets[r][d] * g.dilation[d];
      if (t < 0 || t % g.stride[d] != 0) return false;
      v = t / g.stride[d];
    }
    if (v < 0 || v >= g.out_shape[d]) return false;
    (*y)[d] = v;
  }
  return true;
}

// Input coordinate feeding output y through tap r, or false when there is none.
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

int64_t gcd64(int64_t a, int64_t b) { return b == 0 ? a : gcd64(b, a % b); }

// Regular (strided) or transposed conv: output sites are every site some input reaches,
// sorted by (batch, coordinate); returns (out_indices [M, 1+D], nbr [M, K]).
std::tuple<at::Tensor, at::Tensor> build_conv_map(const at::Tensor& indices, at::IntArrayRef in_shape,
                                                  at::IntArrayRef out_shape, at::IntArrayRef ksize,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, bool transposed) {
  const int ndim = static_cast<int>(in_shape.size());
  check_indices(indices, ndim);
  ConvGeometry g(ndim, in_shape, out_shape, ksize, stride, padding, dilation);
  const int64_t n = indices.size(0), kv = g.kernel_volume;
  const int32_t* idx = indices.data_ptr<int32_t>();
  CoordHashTable in_table = build_site_table(indices, g.in_shape, ndim);

  // Upper bound on distinct outputs sizes the output hash table.
  int64_t per_input = 1;
  for (int d = 0; d < ndim; ++d) {
    int64_t taps = transposed ? g.ksize[d]
                              : std::min<int64_t>(g.ksize[d], (g.ksize[d] * gcd64(g.dilation[d], g.stride[d]) +
                                                               g.stride[d] - 1) / g.stride[d]);
    per_input *= std::max<int64_t>(taps, 1);
  }
  CoordHashTable out_table(std::max<int64_t>(n * per_input, 1));
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t b;
      Coord x, y;
      read_coord(idx + i * (ndim + 1), ndim, &b, &x);
      for (int64_t r = 0; r < kv; ++r) {
        if (!output_of(g, transposed, x, r, &y)) continue;
        bool inserted;
        out_table.insert(linear_key(b, y, g.out_shape, ndim), &inserted);
      }
    }
  });

  std::vector<int64_t> keys;
  for (int64_t s = 0; s < out_table.capacity(); ++s) {
    if (out_table.key_at(s) != CoordHashTable::kEmpty) keys.push_back(out_table.key_at(s));
  }
  std::sort(keys.begin(), keys.end());
  const int64_t m = static_cast<int64_t>(keys.size());
  TORCH_CHECK_VALUE(m < (int64_t(1) << 31), "spconv: more than 2^31-1 output sites");

  at::Tensor out_indices = at::empty({m, ndim + 1}, indices.options());
  at::Tensor nbr = at::empty({m, kv}, indices.options());
  int32_t* oidx = out_indices.data_ptr<int32_t>();
  int32_t* onbr = nbr.data_ptr<int32_t>();
  at::parallel_for(0, m, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      int64_t b;
      Coord y, x;
      decode_key(keys[j], g.out_shape, ndim, &b, &y);
      oidx[j * (ndim + 1)] = static_cast<int32_t>(b);
      for (int d = 0; d < ndim; ++d) oidx[j * (ndim + 1) + 1 + d] = static_cast<int32_t>(y[d]);
      for (int64_t r = 0; r < kv; ++r) {
        onbr[j * kv + r] =
            input_of(g, transposed, y, r, &x) ? in_table.find(linear_key(b, x, g.in_shape, ndim)) : -1;
      }
    }
  });
  return {out_indices, nbr};
}

// Input-major view of a map: nbr_in[i, r] = the output row that input i feeds through tap r, or -1.
at::Tensor invert_map(const at::Tensor& nbr, int64_t num_inputs) {
  TORCH_CHECK_VALUE(nbr.dim() == 2 && nbr.scalar_type() == at::kInt && nbr.is_contiguous(),
                    "spconv: nbr must be a contiguous int32 [M, K] tensor");
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
  m.def("build_subm_map(Tensor indices, int[] spatial_shape, int[] ksize, int[] dilation) -> Tensor");
  m.def(
      "build_conv_map(Tensor indices, int[] in_shape, int[] out_shape, int[] ksize, int[] stride, int[] padding, "
      "int[] dilation, bool transposed) -> (Tensor, Tensor)");
  m.def("invert_map(Tensor nbr, int num_inputs) -> Tensor");
}

TORCH_LIBRARY_IMPL(spconv, CPU, m) {
  m.impl("build_subm_map", &build_subm_map);
  m.impl("build_conv_map", &build_conv_map);
  m.impl("invert_map", &invert_map);
}

}  // namespace spconv
