// bf16 x bf16 -> fp32 tile GEMM with AVX512-BF16 dot products (vdpbf16ps), for CPUs without AMX.
//
//   C[m, n] (+)= A[m, kp] @ B, where A is row-major bf16 (kp even, zero padded) and B is packed as
//   [kp / 2][np][2] bf16 (pairs of k interleaved, np = n rounded up to 16, zero padded).
// Register blocking: 6 rows x up to 4 vectors of 16 columns, accumulators stay in registers.
#pragma once
#include <cstdint>
#include <cstdlib>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

#include "spconv/cpu_features.h"
#define SPCONV_HAS_BF16_KERNEL 1

namespace spconv {

// SPCONV_DISABLE_AVX512=1 turns it off too (see implicit_gemm.h), and so does SPCONV_BF16_KERNEL=portable.
inline bool cpu_has_avx512_bf16() {
  static const bool has = [] {
    const char* off = std::getenv("SPCONV_DISABLE_AVX512");
    return !(off != nullptr && off[0] != '\0' && off[0] != '0') && __builtin_cpu_supports("avx512bf16") &&
           __builtin_cpu_supports("avx512bw");
  }();
  return has && bf16_kernel() != Bf16Kernel::portable;
}

namespace bf16_detail {

template <int MB, int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void micro_kernel(
    int64_t kpairs, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t np, float* c, int64_t ldc,
    bool accumulate, __mmask16 last_mask) {
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      const __mmask16 mask = (j == NB - 1) ? last_mask : __mmask16(0xffff);
      acc[i][j] = accumulate ? _mm512_maskz_loadu_ps(mask, c + i * ldc + 16 * j) : _mm512_setzero_ps();
    }
  for (int64_t kk = 0; kk < kpairs; ++kk) {
    __m512bh bv[NB];
    for (int j = 0; j < NB; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(b + (kk * np + 16 * j) * 2);
    for (int i = 0; i < MB; ++i) {
      int32_t pair;
      __builtin_memcpy(&pair, a + i * lda + 2 * kk, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      const __mmask16 mask = (j == NB - 1) ? last_mask : __mmask16(0xffff);
      _mm512_mask_storeu_ps(c + i * ldc + 16 * j, mask, acc[i][j]);
    }
}

template <int NB>
inline void column_block(int64_t m, int64_t kpairs, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t np,
                         float* c, int64_t ldc, bool accumulate, __mmask16 last_mask) {
  int64_t i = 0;
  for (; i + 6 <= m; i += 6)
    micro_kernel<6, NB>(kpairs, a + i * lda, lda, b, np, c + i * ldc, ldc, accumulate, last_mask);
  for (; i < m; ++i) micro_kernel<1, NB>(kpairs, a + i * lda, lda, b, np, c + i * ldc, ldc, accumulate, last_mask);
}

}  // namespace bf16_detail

inline void bf16_tile_gemm(int64_t m, int64_t n, int64_t kp, const uint16_t* a, int64_t lda, const uint16_t* b,
                           int64_t np, float* c, int64_t ldc, bool accumulate) {
  const int64_t kpairs = kp / 2;
  for (int64_t n0 = 0; n0 < n; n0 += 64) {
    const int64_t cols = std::min<int64_t>(64, n - n0);
    const int nb = static_cast<int>((cols + 15) / 16);
    const int64_t tail = cols - 16 * (nb - 1);
    const __mmask16 last_mask = static_cast<__mmask16>(tail == 16 ? 0xffff : ((1u << tail) - 1));
    const uint16_t* bb = b + n0 * 2;
    float* cc = c + n0;
    switch (nb) {
      case 1: bf16_detail::column_block<1>(m, kpairs, a, lda, bb, np, cc, ldc, accumulate, last_mask); break;
      case 2: bf16_detail::column_block<2>(m, kpairs, a, lda, bb, np, cc, ldc, accumulate, last_mask); break;
      case 3: bf16_detail::column_block<3>(m, kpairs, a, lda, bb, np, cc, ldc, accumulate, last_mask); break;
      default: bf16_detail::column_block<4>(m, kpairs, a, lda, bb, np, cc, ldc, accumulate, last_mask); break;
    }
  }
}

}  // namespace spconv
#endif
