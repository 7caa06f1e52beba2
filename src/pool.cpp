// Sparse max and average pooling on the CPU over an output-major neighbour table [N_out, K].
//   max: out[j, c] = max over active taps of in[table[j, r], c]; argmax keeps the winning input row
//        (the first tap on ties). Backward goes input-major, so each thread owns its input rows.
//   avg: out[j] = sum over active taps / number of active taps (sites that exist, not the kernel volume).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>
#include <tuple>

namespace spconv {
namespace {

void check_pool_args(const at::Tensor& features, const at::Tensor& table) {
  TORCH_CHECK_VALUE(features.dim() == 2 && features.device().is_cpu(), "spconv: features must be a 2-D CPU tensor");
  TORCH_CHECK_VALUE(table.dim() == 2 && table.scalar_type() == at::kInt && table.is_contiguous(),
                    "spconv: neighbour table must be a contiguous int32 [N, K] tensor");
}

std::tuple<at::Tensor, at::Tensor> maxpool_forward(const at::Tensor& features_in, const at::Tensor& table) {
  check_pool_args(features_in, table);
  const at::Tensor features = features_in.contiguous();
  const int64_t m = table.size(0), kv = table.size(1), c = features.size(1);
  at::Tensor out = at::zeros({m, c}, features.options());
  at::Tensor argmax = at::full({m, c}, -1, table.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "spconv_maxpool", [&] {
    const scalar_t* in = features.data_ptr<scalar_t>();
    const int32_t* tp = table.data_ptr<int32_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    int32_t* ap = argmax.data_ptr<int32_t>();
    at::parallel_for(0, m, 256, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        scalar_t* orow = op + j * c;
        int32_t* arow = ap + j * c;
        for (int64_t r = 0; r < kv; ++r) {
          const int32_t i = tp[j * kv + r];
          if (i < 0) continue;
          const scalar_t* irow = in + int64_t(i) * c;
          for (int64_t ch = 0; ch < c; ++ch) {
            if (arow[ch] < 0 || irow[ch] > orow[ch]) {
              orow[ch] = irow[ch];
              arow[ch] = i;
            }
          }
        }
      }
    });
  });
  return {out, argmax};
}

// din[i, c] = sum over taps r of dout[j, c] where j = table_in[i, r] and argmax[j, c] == i.
at::Tensor maxpool_backward(const at::Tensor& out_grad_in, const at::Tensor& argmax, const at::Tensor& table_in) {
  check_pool_args(out_grad_in, table_in);
  const at::Tensor out_grad = out_grad_in.contiguous();
  const int64_t n = table_in.size(0), kv = table_in.size(1), c = out_grad.size(1);
  at::Tensor din = at::zeros({n, c}, out_grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_grad.scalar_type(), "spconv_maxpool_bwd", [&] {
    const scalar_t* gp = out_grad.data_ptr<scalar_t>();
    const int32_t* ap = argmax.data_ptr<int32_t>();
    const int32_t* tp = table_in.data_ptr<int32_t>();
    scalar_t* dp = din.data_ptr<scalar_t>();
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* drow = dp + i * c;
        for (int64_t r = 0; r < kv; ++r) {
          const int32_t j = tp[i * kv + r];
          if (j < 0) continue;
          const int32_t* arow = ap + int64_t(j) * c;
          const scalar_t* grow = gp + int64_t(j) * c;
          for (int64_t ch = 0; ch < c; ++ch) {
            if (arow[ch] == i) drow[ch] += grow[ch];
          }
        }
      }
    });
  });
  return din;
}

// Number of active taps per output row, int32 [N_out].
at::Tensor active_counts(const at::Tensor& table) {
  return (table >= 0).sum(1, /*keepdim=*/false, at::kInt);
}

at::Tensor avgpool_forward(const at::Tensor& features_in, const at::Tensor& table) {
  check_pool_args(features_in, table);
  const at::Tensor features = features_in.contiguous();
  const int64_t m = table.size(0), kv = table.size(1), c = features.size(1);
  at::Tensor out = at::zeros({m, c}, features.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "spconv_avgpool", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = features.data_ptr<scalar_t>();
    const int32_t* tp = table.data_ptr<int32_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, m, 256, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(c);
      for (int64_t j = begin; j < end; ++j) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        int64_t count = 0;
        for (int64_t r = 0; r < kv; ++r) {
          const int32_t i = tp[j * kv + r];
          if (i < 0) continue;
          ++count;
          const scalar_t* irow = in + int64_t(i) * c;
          for (int64_t ch = 0; ch < c; ++ch) acc[ch] += static_cast<acc_t>(irow[ch]);
        }
        const acc_t scale = count > 0 ? acc_t(1) / acc_t(count) : acc_t(0);
        for (int64_t ch = 0; ch < c; ++ch) op[j * c + ch] = static_cast<scalar_t>(acc[ch] * scale);
      }
    });
  });
  return out;
}

// din[i] = sum over taps r of dout[j] / count[j], j = table_in[i, r].
at::Tensor avgpool_backward(const at::Tensor& out_grad_in, const at::Tensor& counts, const at::Tensor& table_in) {
  check_pool_args(out_grad_in, table_in);
  const at::Tensor out_grad = out_grad_in.contiguous();
  const int64_t n = table_in.size(0), kv = table_in.size(1), c = out_grad.size(1);
  at::Tensor din = at::zeros({n, c}, out_grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_grad.scalar_type(), "spconv_avgpool_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = out_grad.data_ptr<scalar_t>();
    const int32_t* cp = counts.data_ptr<int32_t>();
    const int32_t* tp = table_in.data_ptr<int32_t>();
    scalar_t* dp = din.data_ptr<scalar_t>();
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(c);
      for (int64_t i = begin; i < end; ++i) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t r = 0; r < kv; ++r) {
          const int32_t j = tp[i * kv + r];
          if (j < 0) continue;
          const acc_t scale = acc_t(1) / acc_t(cp[j]);
          const scalar_t* grow = gp + int64_t(j) * c;
          for (int64_t ch = 0; ch < c; ++ch) acc[ch] += static_cast<acc_t>(grow[ch]) * scale;
        }
        for (int64_t ch = 0; ch < c; ++ch) dp[i * c + ch] = static_cast<scalar_t>(acc[ch]);
      }
    });
  });
  return din;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spconv, m) {
  m.def("maxpool_forward(Tensor features, Tensor table) -> (Tensor, Tensor)");
  m.def("maxpool_backward(Tensor out_grad, Tensor argmax, Tensor table_in) -> Tensor");
  m.def("active_counts(Tensor table) -> Tensor");
  m.def("avgpool_forward(Tensor features, Tensor table) -> Tensor");
  m.def("avgpool_backward(Tensor out_grad, Tensor counts, Tensor table_in) -> Tensor");
}

TORCH_LIBRARY_IMPL(spconv, CPU, m) {
  m.impl("maxpool_forward", &maxpool_forward);
  m.impl("maxpool_backward", &maxpool_backward);
  m.impl("active_counts", &active_counts);
  m.impl("avgpool_forward", &avgpool_forward);
  m.impl("avgpool_backward", &avgpool_backward);
}

}  // namespace spconv
