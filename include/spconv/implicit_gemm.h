// AVX-512 micro-kernels of the implicit-GEMM sparse convolution (no gathered copies of the features).
//
// Forward / backward-input, per kernel tap and block of M (destination row, source row) pairs:
//   c[i][0:16NB] += sum_k a[i][k] * b[k][0:16NB]        a[i] = a source feature row, c[i] = its fp32
//                                                      accumulator row, b = the tap's packed weight
// fp32 uses FMAs with the source value broadcast; bf16 uses vdpbf16ps on pairs of source channels
// (b packed as [k / 2][ldb][2]) with fp32 accumulators. Accumulators live in registers for the whole
// k loop; the k loop is unrolled by KU so the M row pointers are read once per KU steps.
//
// Weight gradient, per tap and block of M input channels:
//   c[m][0:16NB] += sum_p src[s_p][i0 + m] * dout[j_p][o0 : o0 + 16NB]   (fp32 accumulation, any input type)
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define SPCONV_HAS_AVX512_KERNELS 1
#define SPCONV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define SPCONV_UNROLL _Pragma("GCC unroll 32")  // GCC keeps register tiles in registers only when fully unrolled
#define SPCONV_AVX512_INLINE __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma"), always_inline)) inline

namespace spconv {

// SPCONV_DISABLE_AVX512=1 (read once) forces the portable kernels, e.g. to test them on an AVX-512 machine.
inline bool avx512_disabled_by_env() {
  static const bool off = [] {
    const char* v = std::getenv("SPCONV_DISABLE_AVX512");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return off;
}

inline bool cpu_has_avx512() {
  static const bool has = !avx512_disabled_by_env() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq");
  return has;
}

inline bool cpu_has_avx512_bf16_dot() {
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
}

namespace igemm {

// The M x NB fp32 accumulators of rows c[0..M) (16 NB columns each), to and from registers.
// Rows [rows, cd] of an fp32 accumulator tile (row stride ldc) written as bf16 rows of cd columns,
// rounded to nearest even (vcvtneps2bf16); the tail of each row is masked.
SPCONV_AVX512 inline void store_tile_bf16(const float* acc, int64_t ldc, int64_t rows, int64_t cd, uint16_t* dst) {
  for (int64_t t = 0; t < rows; ++t) {
    const float* a = acc + t * ldc;
    uint16_t* d = dst + t * cd;
    for (int64_t c = 0; c < cd; c += 16) {
      const int64_t w = cd - c < 16 ? cd - c : 16;
      const __mmask16 mask = static_cast<__mmask16>(w == 16 ? 0xffff : (1u << w) - 1);
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, a + c));
      _mm256_mask_storeu_epi16(d + c, mask, h);
    }
  }
}

template <int M, int NB>
SPCONV_AVX512_INLINE void load_rows(__m512 (&acc)[M][NB], float* const* c) {
  SPCONV_UNROLL
  for (int i = 0; i < M; ++i)
    SPCONV_UNROLL
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_loadu_ps(c[i] + 16 * j);
}

template <int M, int NB>
SPCONV_AVX512_INLINE void store_rows(const __m512 (&acc)[M][NB], float* const* c) {
  SPCONV_UNROLL
  for (int i = 0; i < M; ++i)
    SPCONV_UNROLL
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(c[i] + 16 * j, acc[i][j]);
}

// One source value as fp32 (bf16 is the top half of an fp32).
SPCONV_AVX512_INLINE float load_scalar(const float* p) { return *p; }
SPCONV_AVX512_INLINE float load_scalar(const uint16_t* p) {
  const uint32_t bits = uint32_t(*p) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// ---- fp32: c[i] += a[i][0:k] @ b[0:k][0:16NB] ----------------------------------------------------
// TA = float, or uint16_t for bf16 features on fp32 FMAs (CPUs where vdpbf16ps gains nothing over FMA).
template <int M, int NB, int KU, typename TA = float>
SPCONV_AVX512 void fp32_rows(int64_t k, const TA* const* a, float* const* c, const float* b, int64_t ldb) {
  __m512 acc[M][NB];
  load_rows<M, NB>(acc, c);
  int64_t p = 0;
  for (; p + KU <= k; p += KU) {
    __m512 bv[KU][NB];
    SPCONV_UNROLL
    for (int u = 0; u < KU; ++u)
      SPCONV_UNROLL
      for (int j = 0; j < NB; ++j) bv[u][j] = _mm512_loadu_ps(b + (p + u) * ldb + 16 * j);
    SPCONV_UNROLL
    for (int i = 0; i < M; ++i) {
      const TA* ai = a[i] + p;
      SPCONV_UNROLL
      for (int u = 0; u < KU; ++u) {
        const __m512 av = _mm512_set1_ps(load_scalar(ai + u));
        SPCONV_UNROLL
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[u][j], acc[i][j]);
      }
    }
  }
  for (; p < k; ++p) {
    __m512 bv[NB];
    SPCONV_UNROLL
    for (int j = 0; j < NB; ++j) bv[j] = _mm512_loadu_ps(b + p * ldb + 16 * j);
    SPCONV_UNROLL
    for (int i = 0; i < M; ++i) {
      const __m512 av = _mm512_set1_ps(load_scalar(a[i] + p));
      SPCONV_UNROLL
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  store_rows<M, NB>(acc, c);
}

// ---- bf16: c[i] += a[i][0:k] @ b, b packed [ceil(k/2)][ldb][2] ------------------------------------
SPCONV_AVX512_INLINE __m512bh bf16_pair(const uint16_t* a, int64_t p, int64_t k) {
  int32_t pair;
  if (p + 1 < k) {
    std::memcpy(&pair, a + p, sizeof(pair));
  } else {
    pair = a[p];  // odd k: the missing partner is 0 (its weight row is zero padded too)
  }
  return (__m512bh)_mm512_set1_epi32(pair);
}

template <int M, int NB, int KU>
SPCONV_AVX512 void bf16_rows(int64_t k, const uint16_t* const* a, float* const* c, const uint16_t* b, int64_t ldb) {
  __m512 acc[M][NB];
  load_rows<M, NB>(acc, c);
  const int64_t kfull = k / 2 * 2;  // channels in complete pairs
  int64_t p = 0;
  for (; p + 2 * KU <= kfull; p += 2 * KU) {
    __m512bh bv[KU][NB];
    SPCONV_UNROLL
    for (int u = 0; u < KU; ++u)
      SPCONV_UNROLL
      for (int j = 0; j < NB; ++j) bv[u][j] = (__m512bh)_mm512_loadu_si512(b + ((p / 2 + u) * ldb + 16 * j) * 2);
    SPCONV_UNROLL
    for (int i = 0; i < M; ++i) {
      const uint16_t* ai = a[i] + p;
      SPCONV_UNROLL
      for (int u = 0; u < KU; ++u) {
        int32_t pair;
        std::memcpy(&pair, ai + 2 * u, sizeof(pair));
        const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
        SPCONV_UNROLL
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[u][j]);
      }
    }
  }
  for (; p < k; p += 2) {
    __m512bh bv[NB];
    SPCONV_UNROLL
    for (int j = 0; j < NB; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(b + ((p / 2) * ldb + 16 * j) * 2);
    SPCONV_UNROLL
    for (int i = 0; i < M; ++i) {
      const __m512bh av = bf16_pair(a[i], p, k);
      SPCONV_UNROLL
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
    }
  }
  store_rows<M, NB>(acc, c);
}

// ---- weight gradient ------------------------------------------------------------------------------
SPCONV_AVX512_INLINE __m512 load_vec(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
SPCONV_AVX512_INLINE __m512 load_vec(const uint16_t* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// c[m][0:16NB] (ldc apart) += sum_p src[s[p] * lds + m] * dout[j[p] * ldd + 0:16NB]; the last vector
// of dout is read with last_mask (columns past C_out read as 0).
template <int M, int NB, typename T>
SPCONV_AVX512 void wgrad_rows(int64_t n, const int32_t* s, const int32_t* jrow, const T* src, int64_t lds,
                              const T* dout, int64_t ldd, float* c, int64_t ldc, __mmask16 last_mask) {
  __m512 acc[M][NB];
  SPCONV_UNROLL
  for (int m = 0; m < M; ++m)
    SPCONV_UNROLL
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_loadu_ps(c + m * ldc + 16 * j);
  for (int64_t p = 0; p < n; ++p) {
    const T* sr = src + int64_t(s[p]) * lds;
    const T* dr = dout + int64_t(jrow[p]) * ldd;
    __m512 bv[NB];
    SPCONV_UNROLL
    for (int j = 0; j < NB; ++j) bv[j] = load_vec(dr + 16 * j, j == NB - 1 ? last_mask : __mmask16(0xffff));
    SPCONV_UNROLL
    for (int m = 0; m < M; ++m) {
      const __m512 av = _mm512_set1_ps(load_scalar(sr + m));
      SPCONV_UNROLL
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_fmadd_ps(av, bv[j], acc[m][j]);
    }
  }
  SPCONV_UNROLL
  for (int m = 0; m < M; ++m)
    SPCONV_UNROLL
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(c + m * ldc + 16 * j, acc[m][j]);
}

}  // namespace igemm
}  // namespace spconv
#endif
