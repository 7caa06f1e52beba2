// Cache sizes, AMX detection and the bf16 kernel choice (see include/spconv/cpu_features.h).
// No torch headers here: this translation unit compiles in seconds.
#include "spconv/cpu_features.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "spconv/implicit_gemm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#endif

namespace spconv {
namespace {

int64_t env_bytes(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || v[0] == '\0') return 0;
  const long long n = std::atoll(v);
  return n > 0 ? n : 0;
}

// /sys/devices/system/cpu/cpu0/cache/index*/{level,type,size}: "48K", "2048K", "1M".
int64_t sysfs_cache(int level, bool data) {
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    char buf[64] = {0};
    FILE* f = std::fopen((dir + "level").c_str(), "r");
    if (f == nullptr) break;
    const bool got = std::fgets(buf, sizeof(buf), f) != nullptr;
    std::fclose(f);
    if (!got || std::atoi(buf) != level) continue;
    f = std::fopen((dir + "type").c_str(), "r");
    if (f == nullptr) continue;
    std::memset(buf, 0, sizeof(buf));
    const bool got_type = std::fgets(buf, sizeof(buf), f) != nullptr;
    std::fclose(f);
    if (!got_type || (data && std::strncmp(buf, "Instruction", 11) == 0)) continue;  // L1i is not ours
    f = std::fopen((dir + "size").c_str(), "r");
    if (f == nullptr) continue;
    std::memset(buf, 0, sizeof(buf));
    const bool got_size = std::fgets(buf, sizeof(buf), f) != nullptr;
    std::fclose(f);
    if (!got_size) continue;
    char* end = nullptr;
    const long long n = std::strtoll(buf, &end, 10);
    if (n <= 0) continue;
    const int64_t scale = (end && *end == 'K') ? 1024 : (end && *end == 'M') ? 1024 * 1024 : 1;
    return n * scale;
  }
  return 0;
}

CacheSizes detect_caches() {
  CacheSizes c{0, 0, "default"};
#ifdef _SC_LEVEL1_DCACHE_SIZE
  c.l1d = sysconf(_SC_LEVEL1_DCACHE_SIZE) > 0 ? sysconf(_SC_LEVEL1_DCACHE_SIZE) : 0;
  c.l2 = sysconf(_SC_LEVEL2_CACHE_SIZE) > 0 ? sysconf(_SC_LEVEL2_CACHE_SIZE) : 0;
  if (c.l1d > 0 && c.l2 > 0) c.source = "sysconf";
#endif
  if (c.l1d <= 0 || c.l2 <= 0) {
    const int64_t l1 = sysfs_cache(1, true), l2 = sysfs_cache(2, false);
    if (l1 > 0 && l2 > 0) {
      c.l1d = l1;
      c.l2 = l2;
      c.source = "sysfs";
    }
  }
  if (c.l1d <= 0 || c.l2 <= 0) {  // unknown: a conservative x86 server core
    c.l1d = 32 * 1024;
    c.l2 = 1024 * 1024;
    c.source = "default";
  }
  const int64_t e1 = env_bytes("SPCONV_L1D_BYTES"), e2 = env_bytes("SPCONV_L2_BYTES");
  if (e1 > 0 || e2 > 0) {
    if (e1 > 0) c.l1d = e1;
    if (e2 > 0) c.l2 = e2;
    c.source = "env";
  }
  return c;
}

bool detect_amx_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, a, b, c, d);
  const bool amx_bf16 = (d >> 22) & 1u, amx_tile = (d >> 24) & 1u;
  if (!amx_bf16 || !amx_tile) return false;
#if defined(__linux__)
  // Linux hands out the 8 KB tile-data state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return true;
#endif
#else
  return false;
#endif
}

#ifdef SPCONV_HAS_AVX512_KERNELS
// 12 independent accumulator chains, so the loop is bound by issue rate, not latency.
SPCONV_AVX512 __attribute__((noinline)) float fma_loop(int64_t n, float seed) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(seed * i);
  const __m512 a = _mm512_set1_ps(seed), b = _mm512_set1_ps(1.0f - seed);
  for (int64_t it = 0; it < n; ++it)
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(a, b, acc[i]);
  __m512 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

SPCONV_AVX512 __attribute__((noinline)) float dot_loop(int64_t n, float seed) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(seed * i);
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(seed), _mm512_set1_ps(seed));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.0f - seed), _mm512_set1_ps(1.0f - seed));
  for (int64_t it = 0; it < n; ++it)
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  __m512 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

double measure_dot_speedup() {
  if (!cpu_has_avx512_bf16_dot()) return 0.0;
  const int64_t n = 4000;  // 48k instructions per loop, tens of microseconds
  volatile float sink = 0.f;
  double t_fma = 1e30, t_dot = 1e30;
  for (int trial = 0; trial < 7; ++trial) {  // best of several: the other core's load only slows a trial down
    auto t0 = std::chrono::steady_clock::now();
    sink = sink + fma_loop(n, 0.5f + trial * 1e-3f);
    auto t1 = std::chrono::steady_clock::now();
    sink = sink + dot_loop(n, 0.5f + trial * 1e-3f);
    auto t2 = std::chrono::steady_clock::now();
    t_fma = std::min(t_fma, std::chrono::duration<double>(t1 - t0).count());
    t_dot = std::min(t_dot, std::chrono::duration<double>(t2 - t1).count());
  }
  return t_dot > 0 ? 2.0 * t_fma / t_dot : 0.0;  // a vdpbf16ps does twice the FLOPs of an FMA
}
#else
double measure_dot_speedup() { return 0.0; }
#endif

bool avx512_bf16_usable() {
#ifdef SPCONV_HAS_AVX512_KERNELS
  return cpu_has_avx512_bf16_dot();
#else
  return false;
#endif
}

bool x86() {
#if defined(__x86_64__)
  return true;
#else
  return false;
#endif
}

bool avx512_usable() {
#ifdef SPCONV_HAS_AVX512_KERNELS
  return cpu_has_avx512();
#else
  return false;
#endif
}

// What a requested kernel becomes on this CPU: avx512 needs AVX512-BF16, fp32 AVX-512, brgemm x86 (oneDNN).
Bf16Kernel runnable(Bf16Kernel k) {
  if (k == Bf16Kernel::brgemm && !x86()) k = Bf16Kernel::avx512;
  if (k == Bf16Kernel::avx512 && !avx512_bf16_usable()) k = Bf16Kernel::fp32;
  if (k == Bf16Kernel::fp32 && !avx512_usable()) k = Bf16Kernel::portable;
  return k;
}

std::atomic<int> g_kernel{-1};
std::atomic<bool> g_forced{false};

int initial_kernel() {
  Bf16Kernel k = bf16_kernel_auto();
  const char* v = std::getenv("SPCONV_BF16_KERNEL");
  if (v != nullptr && v[0] != '\0') {
    Bf16Kernel forced;
    if (parse_bf16_kernel(v, &forced)) {
      k = runnable(forced);
      g_forced.store(std::strcmp(v, "auto") != 0);
    } else {
      std::fprintf(stderr, "spconv: ignoring SPCONV_BF16_KERNEL=%s (expected brgemm, avx512, fp32, portable or auto)\n",
                   v);
    }
  }
  return static_cast<int>(k);
}

}  // namespace

const CacheSizes& cpu_cache_sizes() {
  static const CacheSizes c = detect_caches();
  return c;
}

bool cpu_has_amx_bf16() {
  static const bool has = detect_amx_bf16();
  return has;
}

double bf16_dot_speedup() {
  static const double s = measure_dot_speedup();
  return s;
}

Bf16Kernel bf16_dot_or_fma() {
  return runnable(bf16_dot_speedup() >= 1.3 ? Bf16Kernel::avx512 : Bf16Kernel::fp32);
}

Bf16Kernel bf16_kernel_auto() {
  if (cpu_has_amx_bf16()) return Bf16Kernel::brgemm;
  return bf16_dot_or_fma();
}

Bf16Kernel bf16_kernel() {
  int k = g_kernel.load(std::memory_order_relaxed);
  if (k < 0) {
    int expected = -1;
    g_kernel.compare_exchange_strong(expected, initial_kernel());
    k = g_kernel.load(std::memory_order_relaxed);
  }
  return static_cast<Bf16Kernel>(k);
}

bool bf16_kernel_forced() {
  bf16_kernel();  // reads the environment once
  return g_forced.load(std::memory_order_relaxed);
}

void set_bf16_kernel(Bf16Kernel k, bool forced) {
  bf16_kernel();
  g_kernel.store(static_cast<int>(runnable(k)));
  g_forced.store(forced);
}

const char* bf16_kernel_name(Bf16Kernel k) {
  switch (k) {
    case Bf16Kernel::brgemm: return "brgemm";
    case Bf16Kernel::avx512: return "avx512";
    case Bf16Kernel::fp32: return "fp32";
    default: return "portable";
  }
}

bool parse_bf16_kernel(const char* s, Bf16Kernel* out) {
  if (std::strcmp(s, "brgemm") == 0) *out = Bf16Kernel::brgemm;
  else if (std::strcmp(s, "avx512") == 0) *out = Bf16Kernel::avx512;
  else if (std::strcmp(s, "portable") == 0) *out = Bf16Kernel::portable;
  else if (std::strcmp(s, "fp32") == 0) *out = Bf16Kernel::fp32;
  else if (std::strcmp(s, "auto") == 0) *out = bf16_kernel_auto();
  else return false;
  return true;
}

}  // namespace spconv
