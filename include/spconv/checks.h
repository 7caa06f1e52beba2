// Argument checks shared by the operators of torch.ops.spconv: every op validates what it is given
// (dtype, rank, device, shape agreement, index ranges) and raises a Python ValueError / TypeError /
// IndexError naming the op, the argument and the fix, instead of reading or writing out of bounds.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace spconv {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

inline void check_cpu(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_VALUE(t.defined(), "spconv.", op, ": ", arg, " is an undefined tensor");
  TORCH_CHECK_VALUE(t.device().is_cpu(), "spconv.", op, ": ", arg, " is on ", t.device(),
                    "; this kernel runs on the CPU: move it there with .cpu()");
}

// int32 [rows, cols] table on the CPU; returns it contiguous (a copy only when it was not).
inline at::Tensor check_int32_2d(const at::Tensor& t, const char* op, const char* arg) {
  check_cpu(t, op, arg);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "spconv.", op, ": ", arg, " must be int32, got ", t.scalar_type(),
                   "; convert it with .int()");
  TORCH_CHECK_VALUE(t.dim() == 2, "spconv.", op, ": ", arg, " must be 2-D [N, K], got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(0) <= kInt32Max, "spconv.", op, ": ", arg, " has ", t.size(0),
                    " rows; at most 2^31-1 are supported");
  return t.contiguous();
}

// Floating features [rows, channels] (float32, float64, bfloat16, float16) on the CPU, contiguous.
inline at::Tensor check_features(const at::Tensor& t, const char* op, const char* arg) {
  check_cpu(t, op, arg);
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, "spconv.", op, ": ",
                   arg, " must be float32, float64, bfloat16 or float16, got ", s, "; convert it with .float()");
  TORCH_CHECK_VALUE(t.dim() == 2, "spconv.", op, ": ", arg, " must be 2-D [N, C], got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(0) <= kInt32Max, "spconv.", op, ": ", arg, " has ", t.size(0),
                    " rows; at most 2^31-1 are supported");
  return t.contiguous();
}

// Number of the n int32 values outside [lo, hi), over chunks in parallel (each chunk counts its own, then
// one short sum). One unsigned compare per entry, which vectorises on baseline x86-64 (a min/max pair
// needs SSE4.1): about memory speed, a small fraction of any kernel that reads the table.
inline int64_t count_outside(const int32_t* p, int64_t n, int64_t lo, int64_t hi) {
  if (n == 0) return 0;
  if (hi <= lo) return n;
  const uint32_t ulo = static_cast<uint32_t>(lo);
  const uint64_t range64 = static_cast<uint64_t>(hi - lo);
  if (range64 >= (uint64_t(1) << 32)) return 0;  // every int32 is inside
  const uint32_t range = static_cast<uint32_t>(range64);
  constexpr int64_t kGrain = int64_t(1) << 17;
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  std::vector<int64_t> bad(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int32_t* q = p + c * kGrain;
      const int64_t len = std::min(kGrain, n - c * kGrain);
      int64_t count = 0;
      for (int64_t i = 0; i < len; ++i) count += (static_cast<uint32_t>(q[i]) - ulo) >= range;  // wraps: one test
      bad[c] = count;
    }
  });
  int64_t total = 0;
  for (int64_t c : bad) total += c;
  return total;
}

// Per-column minimum and maximum of a contiguous int32 [rows, cols] array (cols <= 8), chunks of rows in
// parallel: lo[c], hi[c]. Nothing is written when rows == 0.
inline void column_min_max(const int32_t* p, int64_t rows, int64_t cols, int32_t* lo_out, int32_t* hi_out) {
  constexpr int64_t kMaxCols = 8;
  TORCH_INTERNAL_ASSERT(cols >= 1 && cols <= kMaxCols);
  if (rows == 0) return;
  constexpr int64_t kGrain = int64_t(1) << 14;
  const int64_t chunks = (rows + kGrain - 1) / kGrain;
  std::vector<int32_t> lo(chunks * cols), hi(chunks * cols);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int32_t a[kMaxCols], b[kMaxCols];
      const int32_t* q = p + c * kGrain * cols;
      for (int64_t k = 0; k < cols; ++k) a[k] = b[k] = q[k];
      const int64_t len = std::min(kGrain, rows - c * kGrain);
      for (int64_t i = 0; i < len; ++i)
        for (int64_t k = 0; k < cols; ++k) {
          a[k] = std::min(a[k], q[i * cols + k]);
          b[k] = std::max(b[k], q[i * cols + k]);
        }
      std::copy(a, a + cols, lo.begin() + c * cols);
      std::copy(b, b + cols, hi.begin() + c * cols);
    }
  });
  for (int64_t k = 0; k < cols; ++k) {
    lo_out[k] = lo[k];
    hi_out[k] = hi[k];
    for (int64_t c = 1; c < chunks; ++c) {
      lo_out[k] = std::min(lo_out[k], lo[c * cols + k]);
      hi_out[k] = std::max(hi_out[k], hi[c * cols + k]);
    }
  }
}

// Entries of a contiguous int32 table must lie in [lo, hi): a parallel counting pass; only on failure a
// second, sequential one finds the first offending [row, column] and the entries' range for the message.
inline void check_entries(const at::Tensor& t, int64_t lo, int64_t hi, const char* op, const char* arg,
                          const std::string& meaning) {
  const int32_t* p = t.data_ptr<int32_t>();
  const int64_t n = t.numel();
  const int64_t outside = count_outside(p, n, lo, hi);
  if (outside == 0) return;
  const int64_t cols = t.dim() == 2 ? std::max<int64_t>(t.size(1), 1) : 1;
  int64_t bad = 0;
  while (bad < n && p[bad] >= lo && p[bad] < hi) ++bad;
  const auto mm = std::minmax_element(p, p + n);
  TORCH_CHECK_INDEX(false, "spconv.", op, ": ", arg, " holds ", p[bad], " at [", bad / cols, ", ", bad % cols,
                    "] (", outside, " entries out of range, which range over [", *mm.first, ", ", *mm.second,
                    "]); every entry must be in [", lo, ", ", hi, "): ", meaning);
}

// A list argument of one entry per spatial dimension, each in [lo, kInt32Max].
inline void check_dims(at::IntArrayRef v, int ndim, int64_t lo, const char* op, const char* arg) {
  TORCH_CHECK_VALUE(static_cast<int>(v.size()) == ndim, "spconv.", op, ": ", arg, " has ", v.size(),
                    " entries, expected one per spatial dimension (", ndim, "): ", v);
  for (int d = 0; d < ndim; ++d)
    TORCH_CHECK_VALUE(v[d] >= lo && v[d] <= kInt32Max, "spconv.", op, ": ", arg, "[", d, "] = ", v[d],
                      " is out of range: it must be in [", lo, ", 2^31-1] (", arg, " = ", v, ")");
}

}  // namespace spconv
