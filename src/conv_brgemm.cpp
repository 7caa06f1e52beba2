// bf16 implicit GEMM on oneDNN's batch-reduce GEMM ukernel through torch (see include/spconv/conv_brgemm.h).
#include "spconv/conv_brgemm.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "spconv/cpu_features.h"
#include "spconv/implicit_gemm.h"

namespace spconv {

#if defined(CPUBLAS_BRGEMM_BF16BF16F32)

bool brgemm_conv_compiled() { return true; }

int64_t brgemm_tile_rows(int64_t ldw) {
  // The tile's fp32 accumulator rows take a quarter of L2; the gathered panel and the brgemm output block
  // (32 rows each) stay in L1. Larger tiles give each tap more pairs, so fewer partly-filled brgemm calls.
  const int64_t rows = cpu_cache_sizes().l2 / 4 / (ldw * int64_t(sizeof(float)));
  return std::max<int64_t>(kBrgemmBlockRows, std::min<int64_t>(1024, rows / kBrgemmBlockRows * kBrgemmBlockRows));
}

namespace {

#ifdef SPCONV_HAS_AVX512_KERNELS
SPCONV_AVX512 void add_rows_avx512(int64_t m, const int32_t* rows, const float* part, int64_t ldw, float* acc) {
  for (int64_t i = 0; i < m; ++i) {
    float* a = acc + int64_t(rows[i]) * ldw;
    const float* p = part + i * ldw;
    for (int64_t c = 0; c < ldw; c += 16)
      _mm512_storeu_ps(a + c, _mm512_add_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(p + c)));
  }
}

#endif

// acc[rows[i]] += part[i] for i < m (ldw columns, a multiple of 16)
void add_rows(int64_t m, const int32_t* rows, const float* part, int64_t ldw, float* acc) {
#ifdef SPCONV_HAS_AVX512_KERNELS
  if (cpu_has_avx512()) return add_rows_avx512(m, rows, part, ldw, acc);
#endif
  for (int64_t i = 0; i < m; ++i) {
    float* a = acc + int64_t(rows[i]) * ldw;
    const float* p = part + i * ldw;
    for (int64_t c = 0; c < ldw; ++c) a[c] += p[c];
  }
}

void store_bf16(const float* acc, int64_t ldw, int64_t rows, int64_t cd, uint16_t* dst) {
#ifdef SPCONV_HAS_AVX512_KERNELS
  if (cpu_has_avx512_bf16_dot()) return igemm::store_tile_bf16(acc, ldw, rows, cd, dst);
#endif
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t c = 0; c < cd; ++c) dst[t * cd + c] = c10::BFloat16(acc[t * ldw + c]).x;  // round to nearest even
}

inline const c10::BFloat16* as_bf16(const uint16_t* p) { return reinterpret_cast<const c10::BFloat16*>(p); }

// C[mm, ldw] (+)= panel[mm, kp] @ W (kp x ldw, VNNI-2): mm is rounded up to a multiple of 8, so a whole conv
// needs at most four JIT-compiled kernel shapes (torch caches them by shape).
inline void block_gemm(int64_t mm, int64_t kp, int64_t ldw, const uint16_t* panel, const uint16_t* w, float* c,
                       bool add) {
  at::native::cpublas::brgemm(mm, ldw, kp, kp, ldw, ldw, add, as_bf16(panel), as_bf16(w), c, true);
}

}  // namespace

void brgemm_conv_bf16(const uint16_t* src, int64_t cs, const int32_t* table, int64_t n_dst, int64_t kv,
                      const uint16_t* w, int64_t ldw, int64_t cd, uint16_t* dst) {
  if (n_dst == 0) return;
  const int64_t kp = (cs + 1) / 2 * 2, w_tap = kp * ldw;
  // Where oneDNN wants its own B layout (AMX), pack each tap from plain row-major; elsewhere it reads
  // VNNI-2, which is the pair-interleaved layout the weights already have.
  std::vector<uint16_t> repacked;
  const uint16_t* wb = w;
  if (at::native::cpublas::could_pack(at::kBFloat16)) {
    const int64_t kpad = (kp + 31) / 32 * 32;  // room for any K blocking of the packed layout
    repacked.assign(kv * kpad * ldw, 0);
    std::vector<uint16_t> plain(kp * ldw);
    for (int64_t r = 0; r < kv; ++r) {
      const uint16_t* wr = w + r * w_tap;
      for (int64_t k = 0; k < kp; ++k)
        for (int64_t n = 0; n < ldw; ++n) plain[k * ldw + n] = wr[((k / 2) * ldw + n) * 2 + (k & 1)];
      at::native::cpublas::pack(kp, ldw, ldw, ldw, at::kBFloat16, at::kBFloat16, plain.data(),
                                repacked.data() + r * kpad * ldw);
    }
    wb = repacked.data();
  }
  const int64_t w_stride = repacked.empty() ? w_tap : (kp + 31) / 32 * 32 * ldw;
  constexpr int64_t MB = kBrgemmBlockRows;

  const int64_t tr = brgemm_tile_rows(ldw), n_tiles = (n_dst + tr - 1) / tr;
  at::parallel_for(0, n_tiles, 1, [&](int64_t tb, int64_t te) {
    std::vector<float> acc(tr * ldw), part(MB * ldw);
    std::vector<uint16_t> panel(MB * kp, 0);
    std::vector<int32_t> count(kv), prow(kv * tr), psrc(kv * tr);
    for (int64_t tile = tb; tile < te; ++tile) {
      const int64_t j0 = tile * tr, tm = std::min(tr, n_dst - j0);
      // bucket the tile's (row, source) pairs by tap, branch-free
      std::fill(count.begin(), count.end(), 0);
      for (int64_t t = 0; t < tm; ++t) {
        const int32_t* cells = table + (j0 + t) * kv;
        for (int64_t r = 0; r < kv; ++r) {
          const int32_t s = cells[r];
          const int64_t at = r * tr + count[r];
          prow[at] = static_cast<int32_t>(t);
          psrc[at] = s;
          count[r] += s >= 0;
        }
      }
      std::memset(acc.data(), 0, tm * ldw * sizeof(float));
      for (int64_t r = 0; r < kv; ++r) {
        const int64_t n = count[r];
        const int32_t* rows = prow.data() + r * tr;
        const int32_t* srcs = psrc.data() + r * tr;
        for (int64_t p0 = 0; p0 < n; p0 += MB) {
          const int64_t m = std::min(MB, n - p0), mm = (m + 7) / 8 * 8;
          for (int64_t i = 0; i < m; ++i) {
            uint16_t* pr = panel.data() + i * kp;
            std::memcpy(pr, src + int64_t(srcs[p0 + i]) * cs, cs * sizeof(uint16_t));
            if (kp > cs) pr[cs] = 0;
          }
          if (mm > m) std::memset(panel.data() + m * kp, 0, (mm - m) * kp * sizeof(uint16_t));
          block_gemm(mm, kp, ldw, panel.data(), wb + r * w_stride, part.data(), false);
          add_rows(m, rows + p0, part.data(), ldw, acc.data());
        }
      }
      store_bf16(acc.data(), ldw, tm, cd, dst + j0 * cd);
    }
    at::native::cpublas::brgemm_release(true);
  });
}

#else  // torch without the bf16 brgemm API

bool brgemm_conv_compiled() { return false; }
int64_t brgemm_tile_rows(int64_t) { return kBrgemmBlockRows; }
void brgemm_conv_bf16(const uint16_t*, int64_t, const int32_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t,
                      uint16_t*) {
  TORCH_CHECK(false, "spconv: this torch has no bf16 brgemm (at::native::cpublas::brgemm)");
}

#endif

}  // namespace spconv
