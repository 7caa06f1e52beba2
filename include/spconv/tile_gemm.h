// Small row-major GEMM on cache-resident tiles: C[M, N] (+)= A[M, K] @ B[K, N].
// float goes through ATen's batch-reduce GEMM (oneDNN/MKL); double uses a plain loop
// (it serves gradcheck-sized problems).
#pragma once
#include <ATen/native/CPUBlas.h>
#include <cstdint>

namespace spconv {

inline void tile_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                      float* c, int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = 0.f;
    return;
  }
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, false);
}

inline void tile_gemm(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb,
                      double* c, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    double* crow = c + i * ldc;
    if (!accumulate)
      for (int64_t j = 0; j < n; ++j) crow[j] = 0.0;
    for (int64_t p = 0; p < k; ++p) {
      const double av = a[i * lda + p];
      const double* brow = b + p * ldb;
      for (int64_t j = 0; j < n; ++j) crow[j] += av * brow[j];
    }
  }
}

}  // namespace spconv
