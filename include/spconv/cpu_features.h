// What the running CPU offers the conv kernels, read once per process (src/cpu_features.cpp):
//  - data-cache sizes (L1d, L2 per core), from which the implicit-GEMM kernels derive their tile sizes;
//  - AMX (AMX-TILE + AMX-BF16 in cpuid leaf 7, and Linux granting the tile data state to this process);
//  - which bf16 conv kernel runs: oneDNN's batch-reduce GEMM (through torch's at::native::cpublas::brgemm,
//    which uses AMX tiles where the CPU has them), the AVX512-BF16 implicit GEMM (vdpbf16ps), or the
//    portable gather + GEMM path, or bf16 features on the fp32 FMA kernels. SPCONV_BF16_KERNEL=
//    brgemm|avx512|fp32|portable|auto forces one (default auto: brgemm on AMX CPUs for layers of >= 32
//    channels; avx512 where vdpbf16ps beats FMAs, fp32 where it does not; portable without AVX-512).
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


// fp32: bf16 features on the fp32 FMA implicit-GEMM kernels (weights widened once per call), for CPUs
// whose vdpbf16ps issues at half the FMA rate (measured once per process, see bf16_dot_speedup()).
enum class Bf16Kernel : int { portable = 0, avx512 = 1, brgemm = 2, fp32 = 3 };
Bf16Kernel bf16_kernel();                    // the kernel in use (the env var, or the CPU's best)
Bf16Kernel bf16_kernel_auto();               // what auto picks on this CPU
bool bf16_kernel_forced();                   // chosen by SPCONV_BF16_KERNEL or set_bf16_kernel(k, true)
void set_bf16_kernel(Bf16Kernel k, bool forced);  // for benchmarks: switch in-process
const char* bf16_kernel_name(Bf16Kernel k);  // "portable", "avx512", "brgemm", "fp32"
bool parse_bf16_kernel(const char* s, Bf16Kernel* out);  // names above, or "auto"

// Throughput of vdpbf16ps over vfmadd231ps in FLOPs on this core (about 2 where it issues at the FMA rate,
// about 1 where at half), from a ~0.1 ms loop timed once; 0 without AVX512-BF16.
double bf16_dot_speedup();
// The kernel for bf16 layers that are not brgemm's: avx512 where bf16_dot_speedup() >= 1.3, else fp32.
Bf16Kernel bf16_dot_or_fma();

}  // namespace spconv
