// bf16 sparse convolution on oneDNN's batch-reduce GEMM micro-kernel, as torch exposes it
// (at::native::cpublas::brgemm, ATen/native/CPUBlas.h): oneDNN JIT-compiles it for the running CPU, with
// AMX tiles where the CPU has them (Intel Sapphire Rapids and later), AVX512-BF16 or AVX2 otherwise.
//
// Same contract as avx512_conv_bf16 (include/spconv/conv_avx512.h): destination-major table [n_dst, kv],
// weights w[r][ceil(cs / 2)][ldw][2] bf16 (source-channel pairs interleaved, i.e. oneDNN's VNNI-2 layout
// of a [cs, ldw] matrix), fp32 accumulation, dst [n_dst, cd] rounded to bf16.
//
// Per destination tile, the (row, source) pairs of each tap are gathered in blocks of up to 32 into a
// contiguous bf16 panel, multiplied by the tap's weight with one brgemm call into an fp32 block and
// added into the tile's fp32 accumulator rows. Deterministic for a given thread count (no atomics).
#pragma once
#include <cstdint>

namespace spconv {

bool brgemm_conv_compiled();  // torch's brgemm is available to this build

void brgemm_conv_bf16(const uint16_t* src, int64_t cs, const int32_t* table, int64_t n_dst, int64_t kv,
                      const uint16_t* w, int64_t ldw, int64_t cd, uint16_t* dst);

// Rows per destination tile and pairs per brgemm call this CPU uses (from its cache sizes).
int64_t brgemm_tile_rows(int64_t ldw);
constexpr int64_t kBrgemmBlockRows = 32;
// Below this many source or destination channels the automatic choice keeps the AVX512-BF16 kernel.
constexpr int64_t kBrgemmMinChannels = 32;

}  // namespace spconv
