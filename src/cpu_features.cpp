// Cache sizes, AMX detection and the bf16 kernel choice (see include/spconv/cpu_features.h).
// No torch headers here: this translation unit compiles in seconds.
#include "spconv/cpu_features.h"

#include <unistd.h>

#include <atomic>
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

// What a requested kernel becomes on this CPU: avx512 needs AVX512-BF16, brgemm needs x86 (oneDNN).
Bf16Kernel runnable(Bf16Kernel k) {
  if (k == Bf16Kernel::brgemm && !x86()) k = Bf16Kernel::avx512;
  if (k == Bf16Kernel::avx512 && !avx512_bf16_usable()) k = Bf16Kernel::portable;
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
      std::fprintf(stderr, "spconv: ignoring SPCONV_BF16_KERNEL=%s (expected brgemm, avx512, portable or auto)\n",
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

Bf16Kernel bf16_kernel_auto() {
  if (cpu_has_amx_bf16()) return Bf16Kernel::brgemm;
  return runnable(Bf16Kernel::avx512);
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
    default: return "portable";
  }
}

bool parse_bf16_kernel(const char* s, Bf16Kernel* out) {
  if (std::strcmp(s, "brgemm") == 0) *out = Bf16Kernel::brgemm;
  else if (std::strcmp(s, "avx512") == 0) *out = Bf16Kernel::avx512;
  else if (std::strcmp(s, "portable") == 0) *out = Bf16Kernel::portable;
  else if (std::strcmp(s, "auto") == 0) *out = bf16_kernel_auto();
  else return false;
  return true;
}

}  // namespace spconv
