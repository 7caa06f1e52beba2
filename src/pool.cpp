// Sparse max and average pooling on the CPU over an output-major neighbour table [N_out, K].
//   max: out[j, c] = max over active taps of in[table[j, r], c]; argmax keeps the winning input row
//        (the first tap on ties; NaN propagates, as in torch's max_pool). zero_floor=True gives spconv 2.x's
//        max(0, max) with argmax -1 where the floor wins. Backward goes input-major, so each thread owns
//        its input rows.
//   avg: out[j] = sum over active taps / number of active taps (sites that exist, not the kernel volume).
// Every op checks its arguments (dtypes, shapes, table entries in range) before touching memory.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "spconv/checks.h"

#include <atomic>
#include <limits>
#include <string>
#include <utility>
#include <vector>
#include <tuple>

namespace spconv {
namespace {

// features [N_in, C] (floating, contiguous) and an output-major table [N_out, K] whose entries are -1 or rows
// of features; returns the contiguous (features, table).
std::pair<at::Tensor, at::Tensor> check_forward(const at::Tensor& features_in, const at::Tensor& table_in,
                                                const char* op) {
  at::Tensor features = check_features(features_in, op, "features");
  at::Tensor table = check_int32_2d(table_in, op, "table");
  check_entries(table, -1, features.size(0), op, "table",
                "-1 (no input) or a row of features (" + std::to_string(features.size(0)) +
                    " rows); the table was built for other sites than these features");
  return {features, table};
}

// out_grad [N_out, C] and an input-major table [N_in, K] whose entries are -1 or rows of out_grad.
std::pair<at::Tensor, at::Tensor> check_backward(const at::Tensor& out_grad_in, const at::Tensor& table_in,
                                                 const char* op) {
  at::Tensor out_grad = check_features(out_grad_in, op, "out_grad");
  at::Tensor table = check_int32_2d(table_in, op, "table_in");
  check_entries(table, -1, out_grad.size(0), op, "table_in",
                "-1 (no output) or a row of out_grad (" + std::to_string(out_grad.size(0)) +
                    " output sites); pass the input-major (inverted) table of the forward map");
  return {out_grad, table};
}

// Per output row and channel: the max over the active taps and the input row it comes from (the first tap
// on ties). NaN propagates as in torch.nn.functional.max_pool3d: a NaN input makes the output NaN, wherever
// its tap is, and the gradient goes to the first NaN input. Rows without active taps give 0 and argmax -1.
// zero_floor (spconv 2.x's SparseMaxPool, whose loop starts from 0): max(0, max over inputs); an output
// whose max is below 0 gives 0 and argmax -1, so no gradient flows there.
std::tuple<at::Tensor, at::Tensor> maxpool_forward(const at::Tensor& features_in, const at::Tensor& table_in,
                                                   bool zero_floor) {
  const auto checked = check_forward(features_in, table_in, "maxpool_forward");
  const at::Tensor& features = checked.first;
  const at::Tensor& table = checked.second;
  const int64_t m = table.size(0), kv = table.size(1), c = features.size(1);
  at::Tensor out = at::zeros({m, c}, features.options());
  at::Tensor argmax = at::full({m, c}, -1, table.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "spconv_maxpool", [&] {
    using acc_t = at::opmath_type<scalar_t>;
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
            const acc_t v = static_cast<acc_t>(irow[ch]), cur = static_cast<acc_t>(orow[ch]);
            // a NaN output stays (v > NaN is false); a NaN input replaces any non-NaN maximum
            if (arow[ch] < 0 || v > cur || (v != v && cur == cur)) {
              orow[ch] = irow[ch];
              arow[ch] = i;
            }
          }
        }
        if (zero_floor) {
          for (int64_t ch = 0; ch < c; ++ch) {
            if (static_cast<acc_t>(orow[ch]) < acc_t(0)) {  // false for NaN
              orow[ch] = scalar_t(0);
              arow[ch] = -1;
            }
          }
        }
      }
    });
  });
  return {out, argmax};
}

// din[i, c] = sum over taps r of dout[j, c] where j = table_in[i, r] and argmax[j, c] == i.
// argmax entries of -1 (no input: an empty row, or an output floored to 0) route no gradient.
at::Tensor maxpool_backward(const at::Tensor& out_grad_in, const at::Tensor& argmax_in, const at::Tensor& table_in_) {
  const char* op = "maxpool_backward";
  const auto checked = check_backward(out_grad_in, table_in_, op);
  const at::Tensor& out_grad = checked.first;
  const at::Tensor& table_in = checked.second;
  check_cpu(argmax_in, op, "argmax");
  TORCH_CHECK_TYPE(argmax_in.scalar_type() == at::kInt, "spconv.maxpool_backward: argmax must be int32 (as "
                   "maxpool_forward returns it), got ", argmax_in.scalar_type());
  TORCH_CHECK_VALUE(argmax_in.sizes() == out_grad.sizes(), "spconv.maxpool_backward: argmax has shape ", argmax_in.sizes(),
                    " but out_grad ", out_grad.sizes(), "; pass the argmax maxpool_forward returned with this output");
  const at::Tensor argmax = argmax_in.contiguous();
  check_entries(argmax, -1, table_in.size(0), op, "argmax",
                "-1 or an input row below table_in.size(0)=" + std::to_string(table_in.size(0)) +
                    "; argmax and table_in must come from the same pooling layer");
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
at::Tensor active_counts(const at::Tensor& table_in) {
  const at::Tensor table = check_int32_2d(table_in, "active_counts", "table");
  return (table >= 0).sum(1, /*keepdim=*/false, at::kInt);
}

at::Tensor avgpool_forward(const at::Tensor& features_in, const at::Tensor& table_in) {
  const auto checked = check_forward(features_in, table_in, "avgpool_forward");
  const at::Tensor& features = checked.first;
  const at::Tensor& table = checked.second;
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
at::Tensor avgpool_backward(const at::Tensor& out_grad_in, const at::Tensor& counts_in, const at::Tensor& table_in_) {
  const char* op = "avgpool_backward";
  const auto checked = check_backward(out_grad_in, table_in_, op);
  const at::Tensor& out_grad = checked.first;
  const at::Tensor& table_in = checked.second;
  const int64_t n = table_in.size(0), kv = table_in.size(1), c = out_grad.size(1);
  check_cpu(counts_in, op, "counts");
  TORCH_CHECK_TYPE(counts_in.scalar_type() == at::kInt, "spconv.avgpool_backward: counts must be int32 (as "
                   "active_counts returns them), got ", counts_in.scalar_type());
  TORCH_CHECK_VALUE(counts_in.dim() == 1 && counts_in.size(0) == out_grad.size(0), "spconv.avgpool_backward: counts must be "
                    "1-D with one entry per output row (", out_grad.size(0), "), got shape ", counts_in.sizes());
  const at::Tensor counts = counts_in.contiguous();
  check_entries(counts, 0, kv + 1, op, "counts",
                "the number of active taps of each output, between 0 and the kernel volume " + std::to_string(kv));
  std::atomic<bool> zero_count{false};  // an output with count 0 that table_in still routes to
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
          if (cp[j] <= 0) {
            zero_count.store(true, std::memory_order_relaxed);
            continue;
          }
          const acc_t scale = acc_t(1) / acc_t(cp[j]);
          const scalar_t* grow = gp + int64_t(j) * c;
          for (int64_t ch = 0; ch < c; ++ch) acc[ch] += static_cast<acc_t>(grow[ch]) * scale;
        }
        for (int64_t ch = 0; ch < c; ++ch) dp[i * c + ch] = static_cast<scalar_t>(acc[ch]);
      }
    });
  });
  TORCH_CHECK_VALUE(!zero_count.load(), "spconv.avgpool_backward: table_in routes gradient to an output whose count is "
                    "0; counts and table_in must come from the same pooling layer (counts = active_counts(table))");
  return din;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spconv, m) {
  m.def("maxpool_forward(Tensor features, Tensor table, bool zero_floor=False) -> (Tensor, Tensor)");
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
