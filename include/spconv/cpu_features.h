// What the running CPU offers the conv kernels, read once per process (src/cpu_features.cpp):
//  - data-cache sizes (L1d, L2 per core), from which the implicit-GEMM kernels derive their tile sizes;
//  - AMX (AMX-TILE + AMX-BF16 in cpuid leaf 7, and Linux granting the tile data state to this process);
//  - which bf16 conv kernel runs: oneDNN's batch-reduce GEMM (through torch's at::native::cpublas::brgemm,
//    which uses AMX tiles where the CPU has them), the AVX512-BF16 implicit GEMM (vdpbf16ps), or the
//    portable gather + GEMM path. SPCONV_BF16_KERNEL=brgemm|avx512|portable|auto forces one (default auto:
//    brgemm on AMX CPUs, avx512 on CPUs with AVX512-BF16, portable otherwise).
//  SPCONV_L1D_BYTES / SPCONV_L2_BYTES override the detected cache sizes (tests use them to force small tiles).
#pragma once
#include <cstdint>

namespace spconv {

struct CacheSizes {
  int64_t l1d;         // bytes per core
  int64_t l2;          // bytes per core
  const char* source;  // "sysconf", "sysfs", "env" or "default"
};
const CacheSizes& cpu_cache_sizes();

// cpuid AMX-TILE and AMX-BF16 bits, and arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) succeeded.
bool cpu_has_amx_bf16();

enum class Bf16Kernel : int { portable = 0, avx512 = 1, brgemm = 2 };
Bf16Kernel bf16_kernel();                    // the kernel in use (the env var, or the CPU's best)
Bf16Kernel bf16_kernel_auto();               // what auto picks on this CPU
bool bf16_kernel_forced();                   // chosen by SPCONV_BF16_KERNEL or set_bf16_kernel(k, true)
void set_bf16_kernel(Bf16Kernel k, bool forced);  // for benchmarks: switch in-process
const char* bf16_kernel_name(Bf16Kernel k);  // "portable", "avx512", "brgemm"
bool parse_bf16_kernel(const char* s, Bf16Kernel* out);  // names above, or "auto"

}  // namespace spconv
