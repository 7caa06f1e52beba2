// Convolution geometry shared by the kernel-map builders: shapes, kernel offsets, key linearisation.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <array>
#include <cstdint>
#include <vector>

namespace spconv {

constexpr int kMaxDim = 4;
using Coord = std::array<int64_t, kMaxDim>;

struct ConvGeometry {
  int ndim = 0;
  int64_t kernel_volume = 1;
  Coord in_shape{}, out_shape{}, ksize{}, stride{}, padding{}, dilation{};
  std::vector<Coord> offsets;  // offsets[r][d]: kernel tap r (row-major, last dim fastest)

  ConvGeometry(int ndim_, at::IntArrayRef in_shape_, at::IntArrayRef out_shape_, at::IntArrayRef ksize_,
               at::IntArrayRef stride_, at::IntArrayRef padding_, at::IntArrayRef dilation_)
      : ndim(ndim_) {
    TORCH_CHECK_VALUE(ndim >= 1 && ndim <= kMaxDim, "spconv: ndim must be in [1, 4], got ", ndim);
    for (int d = 0; d < ndim; ++d) {
      in_shape[d] = in_shape_[d];
      out_shape[d] = out_shape_[d];
      ksize[d] = ksize_[d];
      stride[d] = stride_[d];
      padding[d] = padding_[d];
      dilation[d] = dilation_[d];
      kernel_volume *= ksize[d];
    }
    offsets.resize(kernel_volume);
    for (int64_t r = 0; r < kernel_volume; ++r) {
      int64_t rest = r;
      for (int d = ndim - 1; d >= 0; --d) {
        offsets[r][d] = rest % ksize[d];
        rest /= ksize[d];
      }
    }
  }
};

// Linear int64 key of (batch, coord) in a grid of the given shape (batch slowest, last dim fastest).
inline int64_t linear_key(int64_t batch, const Coord& c, const Coord& shape, int ndim) {
  int64_t key = batch;
  for (int d = 0; d < ndim; ++d) key = key * shape[d] + c[d];
  return key;
}

inline void decode_key(int64_t key, const Coord& shape, int ndim, int64_t* batch, Coord* c) {
  for (int d = ndim - 1; d >= 0; --d) {
    (*c)[d] = key % shape[d];
    key /= shape[d];
  }
  *batch = key;
}

}  // namespace spconv
