// Implicit-GEMM sparse convolution drivers for AVX-512 CPUs (see include/spconv/conv_avx512.h).
#include "spconv/conv_avx512.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "spconv/conv_brgemm.h"
#include "spconv/cpu_features.h"
#include "spconv/implicit_gemm.h"

namespace spconv {

#ifdef SPCONV_HAS_AVX512_KERNELS

bool avx512_conv_available() { return cpu_has_avx512(); }
// The bf16 forward / backward-input come here with the AVX512-BF16 kernels or oneDNN's brgemm
// (SPCONV_BF16_KERNEL, include/spconv/cpu_features.h); the portable kernel is conv.cpp's gather + GEMM.
bool avx512_bf16_conv_available() {
  const Bf16Kernel k = bf16_kernel();
  return k == Bf16Kernel::brgemm || (k == Bf16Kernel::avx512 && cpu_has_avx512_bf16_dot()) ||
         (k == Bf16Kernel::fp32 && cpu_has_avx512());
}

// Rows per destination tile: the fp32 accumulator tile takes half of this CPU's L1d (24 KB of a 48 KB L1d),
// at least 32 rows, at most 512; a multiple of 16.
int64_t implicit_gemm_tile_rows(int64_t ldc) {
  static const int64_t budget = cpu_cache_sizes().l1d / 2 / int64_t(sizeof(float));  // floats
  return std::max<int64_t>(32, std::min<int64_t>(512, budget / ldc / 16 * 16));
}

namespace {

int64_t tile_rows(int64_t ldc) { return implicit_gemm_tile_rows(ldc); }

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// Register blocking by the number of 16-column vectors NB: M rows x NB accumulators, k unrolled by KU.
template <int NB>
struct Blocking {
  static constexpr int M = NB == 4 ? 6 : NB == 3 ? 8 : NB == 2 ? 12 : 16;
  static constexpr int KU = NB == 4 ? 1 : NB == 3 ? 2 : NB == 2 ? 2 : 8;
};

// The (tile row, source row) pairs of one destination tile, bucketed by tap.
struct TapPairs {
  std::vector<int32_t> count, row, src;
  int64_t stride;
  TapPairs(int64_t kv, int64_t rows) : count(kv), row(kv * rows), src(kv * rows), stride(rows) {}
  void fill(const int32_t* table, int64_t kv, int64_t j0, int64_t rows) {
    std::fill(count.begin(), count.end(), 0);
    int32_t* cnt = count.data();
    for (int64_t t = 0; t < rows; ++t) {
      const int32_t* cells = table + (j0 + t) * kv;
      for (int64_t r = 0; r < kv; ++r) {  // branch-free: a missing tap's slot is overwritten by the next
        const int32_t s = cells[r];
        const int64_t at = r * stride + cnt[r];
        row[at] = static_cast<int32_t>(t);
        src[at] = s;
        cnt[r] += s >= 0;
      }
    }
  }
};

struct Bf16OnFma {};  // kernel tag: bf16 features and output, fp32 weights and FMAs

template <typename K>
struct Kernel;
template <>
struct Kernel<float> {
  using A = float;  // feature type
  using W = float;  // weight type
  static constexpr int64_t wcols = 1;  // weight elements per (k-step, column)
  template <int M, int NB, int KU>
  static void rows(int64_t k, const float* const* a, float* const* c, const float* b, int64_t ldb) {
    igemm::fp32_rows<M, NB, KU>(k, a, c, b, ldb);
  }
};
template <>
struct Kernel<uint16_t> {
  using A = uint16_t;
  using W = uint16_t;
  static constexpr int64_t wcols = 2;  // k pairs interleaved
  template <int M, int NB, int KU>
  static void rows(int64_t k, const uint16_t* const* a, float* const* c, const uint16_t* b, int64_t ldb) {
    igemm::bf16_rows<M, NB, KU>(k, a, c, b, ldb);
  }
};
template <>
struct Kernel<Bf16OnFma> {
  using A = uint16_t;
  using W = float;
  static constexpr int64_t wcols = 1;
  template <int M, int NB, int KU>
  static void rows(int64_t k, const uint16_t* const* a, float* const* c, const float* b, int64_t ldb) {
    igemm::fp32_rows<M, NB, KU, uint16_t>(k, a, c, b, ldb);
  }
};

template <typename K, int M, int NB>
inline void pair_block(const int32_t* rows, const int32_t* srcs, const typename Kernel<K>::A* src, int64_t cs,
                       float* acc, int64_t ldc, const typename Kernel<K>::W* b, int64_t ldb) {
  const typename Kernel<K>::A* a[M];
  float* c[M];
  for (int i = 0; i < M; ++i) {
    a[i] = src + int64_t(srcs[i]) * cs;
    c[i] = acc + int64_t(rows[i]) * ldc;
  }
  Kernel<K>::template rows<M, NB, Blocking<NB>::KU>(cs, a, c, b, ldb);
}

// All n pairs of one tap against one block of NB column vectors: full blocks of M, then 8/4/2/1.
template <typename K, int NB>
void tap_pairs(int64_t n, const int32_t* rows, const int32_t* srcs, const typename Kernel<K>::A* src, int64_t cs,
               float* acc, int64_t ldc, const typename Kernel<K>::W* b, int64_t ldb) {
  constexpr int M = Blocking<NB>::M;
  int64_t p = 0;
  for (; p + M <= n; p += M) pair_block<K, M, NB>(rows + p, srcs + p, src, cs, acc, ldc, b, ldb);
  if (M > 8 && p + 8 <= n) {
    pair_block<K, (M > 8 ? 8 : 1), NB>(rows + p, srcs + p, src, cs, acc, ldc, b, ldb);
    p += M > 8 ? 8 : 1;
  }
  for (; p + 4 <= n; p += 4) pair_block<K, 4, NB>(rows + p, srcs + p, src, cs, acc, ldc, b, ldb);
  for (; p + 2 <= n; p += 2) pair_block<K, 2, NB>(rows + p, srcs + p, src, cs, acc, ldc, b, ldb);
  for (; p < n; ++p) pair_block<K, 1, NB>(rows + p, srcs + p, src, cs, acc, ldc, b, ldb);
}

inline void store_rows(const float* acc, int64_t ldc, int64_t rows, int64_t cd, float* dst) {
  for (int64_t t = 0; t < rows; ++t) std::memcpy(dst + t * cd, acc + t * ldc, cd * sizeof(float));
}

SPCONV_AVX512 void store_rows(const float* acc, int64_t ldc, int64_t rows, int64_t cd, uint16_t* dst) {
  igemm::store_tile_bf16(acc, ldc, rows, cd, dst);
}

template <typename K>
void conv_tiles(const typename Kernel<K>::A* src, int64_t cs, const int32_t* table, int64_t n_dst, int64_t kv,
                const typename Kernel<K>::W* w, int64_t ldw, int64_t cd, typename Kernel<K>::A* dst) {
  using W = typename Kernel<K>::W;
  const int64_t ldc = ldw, tr = tile_rows(ldc);
  const int64_t k_steps = (cs + Kernel<K>::wcols - 1) / Kernel<K>::wcols;
  const int64_t w_tap = k_steps * ldw * Kernel<K>::wcols;  // weight elements per tap
  const int64_t n_tiles = (n_dst + tr - 1) / tr;
  at::parallel_for(0, n_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<float> acc(tr * ldc);
    TapPairs pairs(kv, tr);
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t j0 = tile * tr, tm = std::min(tr, n_dst - j0);
      pairs.fill(table, kv, j0, tm);
      std::memset(acc.data(), 0, tm * ldc * sizeof(float));
      for (int64_t r = 0; r < kv; ++r) {
        const int64_t n = pairs.count[r];
        if (n == 0) continue;
        const int32_t* rows = pairs.row.data() + r * tr;
        const int32_t* srcs = pairs.src.data() + r * tr;
        for (int64_t n0 = 0; n0 < ldc; n0 += 64) {
          const W* b = w + r * w_tap + n0 * Kernel<K>::wcols;
          float* a0 = acc.data() + n0;
          switch (std::min<int64_t>(4, (ldc - n0) / 16)) {
            case 1: tap_pairs<K, 1>(n, rows, srcs, src, cs, a0, ldc, b, ldw); break;
            case 2: tap_pairs<K, 2>(n, rows, srcs, src, cs, a0, ldc, b, ldw); break;
            case 3: tap_pairs<K, 3>(n, rows, srcs, src, cs, a0, ldc, b, ldw); break;
            default: tap_pairs<K, 4>(n, rows, srcs, src, cs, a0, ldc, b, ldw); break;
          }
        }
      }
      store_rows(acc.data(), ldc, tm, cd, dst + j0 * cd);
    }
  });
}

// ---- weight gradient ------------------------------------------------------------------------------
template <typename T, int NB>
void wgrad_channels(int64_t n, const int32_t* srcs, const int32_t* rows, const T* src, int64_t cin, const T* dout,
                    int64_t cout, float* c, int64_t ldc, __mmask16 mask) {
  constexpr int M = Blocking<NB>::M;
  int64_t i = 0;
  for (; i + M <= cin; i += M)
    igemm::wgrad_rows<M, NB, T>(n, srcs, rows, src + i, cin, dout, cout, c + i * ldc, ldc, mask);
  if (M > 8 && i + 8 <= cin) {
    igemm::wgrad_rows<(M > 8 ? 8 : 1), NB, T>(n, srcs, rows, src + i, cin, dout, cout, c + i * ldc, ldc, mask);
    i += M > 8 ? 8 : 1;
  }
  for (; i + 4 <= cin; i += 4)
    igemm::wgrad_rows<4, NB, T>(n, srcs, rows, src + i, cin, dout, cout, c + i * ldc, ldc, mask);
  for (; i + 2 <= cin; i += 2)
    igemm::wgrad_rows<2, NB, T>(n, srcs, rows, src + i, cin, dout, cout, c + i * ldc, ldc, mask);
  for (; i < cin; ++i) igemm::wgrad_rows<1, NB, T>(n, srcs, rows, src + i, cin, dout, cout, c + i * ldc, ldc, mask);
}

constexpr int64_t kWgradChunk = 32;

template <typename T>
void wgrad_tiles(const T* src, int64_t cin, const int32_t* table, int64_t n_dst, int64_t kv, const T* dout,
                 int64_t cout, float* dw) {
  constexpr int64_t tr = 256;
  const int64_t ldo = (cout + 15) / 16 * 16, wsize = kv * cin * ldo;
  const int64_t n_tiles = (n_dst + tr - 1) / tr;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tiles));
  std::vector<float> partial(workers * wsize, 0.f);
  at::parallel_for(0, workers, 1, [&](int64_t wb, int64_t we) {
    TapPairs pairs(kv, tr);
    std::vector<int32_t> jrows(tr);
    for (int64_t wk = wb; wk < we; ++wk) {
      float* pw = partial.data() + wk * wsize;
      for (int64_t tile = n_tiles * wk / workers; tile < n_tiles * (wk + 1) / workers; ++tile) {
        const int64_t j0 = tile * tr, tm = std::min(tr, n_dst - j0);
        pairs.fill(table, kv, j0, tm);
        for (int64_t r = 0; r < kv; ++r) {
          const int64_t n = pairs.count[r];
          if (n == 0) continue;
          const int32_t* srcs = pairs.src.data() + r * tr;
          const int32_t* trow = pairs.row.data() + r * tr;
          for (int64_t p = 0; p < n; ++p) jrows[p] = static_cast<int32_t>(j0 + trow[p]);
          // chunks of pairs small enough for their rows to stay in L1 across all channel blocks
          for (int64_t p0 = 0; p0 < n; p0 += kWgradChunk) {
          const int64_t pn = std::min(kWgradChunk, n - p0);
          for (int64_t o0 = 0; o0 < ldo; o0 += 64) {
            const int64_t nb = std::min<int64_t>(4, (ldo - o0) / 16);
            const int64_t tail = cout - (o0 + 16 * (nb - 1));
            const __mmask16 mask = static_cast<__mmask16>(tail >= 16 ? 0xffff : (1u << tail) - 1);
            float* c = pw + r * cin * ldo + o0;
            const T* d = dout + o0;
            switch (nb) {
              case 1: wgrad_channels<T, 1>(pn, srcs + p0, jrows.data() + p0, src, cin, d, cout, c, ldo, mask); break;
              case 2: wgrad_channels<T, 2>(pn, srcs + p0, jrows.data() + p0, src, cin, d, cout, c, ldo, mask); break;
              case 3: wgrad_channels<T, 3>(pn, srcs + p0, jrows.data() + p0, src, cin, d, cout, c, ldo, mask); break;
              default: wgrad_channels<T, 4>(pn, srcs + p0, jrows.data() + p0, src, cin, d, cout, c, ldo, mask); break;
            }
          }
          }
        }
      }
    }
  });
  for (int64_t wk = 1; wk < workers; ++wk) {
    const float* pw = partial.data() + wk * wsize;
    for (int64_t e = 0; e < wsize; ++e) partial[e] += pw[e];
  }
  for (int64_t ri = 0; ri < kv * cin; ++ri) std::memcpy(dw + ri * cout, partial.data() + ri * ldo, cout * sizeof(float));
}

}  // namespace

void avx512_conv_fp32(const float* src, int64_t cs, const int32_t* table, int64_t n_dst, int64_t kv, const float* w,
                      int64_t ldw, int64_t cd, float* dst) {
  conv_tiles<float>(src, cs, table, n_dst, kv, w, ldw, cd, dst);
}

void avx512_conv_bf16(const uint16_t* src, int64_t cs, const int32_t* table, int64_t n_dst, int64_t kv,
                      const uint16_t* w, int64_t ldw, int64_t cd, uint16_t* dst) {
  // brgemm's per-call cost dominates thin layers (measured on Zen 5: 0.5x the AVX512-BF16 kernel at 16
  // channels, 0.08x at 4); unless forced, they stay on the AVX512-BF16 kernel.
  if (bf16_kernel() == Bf16Kernel::brgemm &&
      (bf16_kernel_forced() || !cpu_has_avx512_bf16_dot() || (cs >= kBrgemmMinChannels && cd >= kBrgemmMinChannels)))
    return brgemm_conv_bf16(src, cs, table, n_dst, kv, w, ldw, cd, dst);
  const Bf16Kernel k = bf16_kernel() == Bf16Kernel::brgemm ? bf16_dot_or_fma() : bf16_kernel();
  if (k == Bf16Kernel::avx512 && cpu_has_avx512_bf16_dot())
    return conv_tiles<uint16_t>(src, cs, table, n_dst, kv, w, ldw, cd, dst);
  // fp32 FMAs on the bf16 features: the pair-packed weights widened to [kv][cs][ldw] fp32 once
  const int64_t w_tap = (cs + 1) / 2 * ldw * 2;
  std::vector<float> wf(kv * cs * ldw);
  for (int64_t r = 0; r < kv; ++r)
    for (int64_t c = 0; c < cs; ++c)
      for (int64_t n = 0; n < ldw; ++n)
        wf[(r * cs + c) * ldw + n] = bf16_to_float(w[r * w_tap + ((c / 2) * ldw + n) * 2 + (c & 1)]);
  conv_tiles<Bf16OnFma>(src, cs, table, n_dst, kv, wf.data(), ldw, cd, dst);
}

void avx512_conv_weight_grad_fp32(const float* src, int64_t cin, const int32_t* table, int64_t n_dst, int64_t kv,
                                  const float* dout, int64_t cout, float* dw) {
  wgrad_tiles<float>(src, cin, table, n_dst, kv, dout, cout, dw);
}

void avx512_conv_weight_grad_bf16(const uint16_t* src, int64_t cin, const int32_t* table, int64_t n_dst,
                                  int64_t kv, const uint16_t* dout, int64_t cout, float* dw) {
  wgrad_tiles<uint16_t>(src, cin, table, n_dst, kv, dout, cout, dw);
}

#else  // no AVX-512 kernels on this compiler/architecture: conv.cpp uses its generic path

bool avx512_conv_available() { return false; }
bool avx512_bf16_conv_available() { return false; }
int64_t implicit_gemm_tile_rows(int64_t) { return 0; }
void avx512_conv_fp32(const float*, int64_t, const int32_t*, int64_t, int64_t, const float*, int64_t, int64_t,
                      float*) {
  TORCH_CHECK(false, "spconv: AVX-512 kernels are not compiled in");
}
void avx512_conv_bf16(const uint16_t*, int64_t, const int32_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t,
                      uint16_t*) {
  TORCH_CHECK(false, "spconv: AVX-512 kernels are not compiled in");
}
void avx512_conv_weight_grad_fp32(const float*, int64_t, const int32_t*, int64_t, int64_t, const float*, int64_t,
                                  float*) {
  TORCH_CHECK(false, "spconv: AVX-512 kernels are not compiled in");
}
void avx512_conv_weight_grad_bf16(const uint16_t*, int64_t, const int32_t*, int64_t, int64_t, const uint16_t*,
                                  int64_t, float*) {
  TORCH_CHECK(false, "spconv: AVX-512 kernels are not compiled in");
}

#endif

}  // namespace spconv
