// Implicit-GEMM sparse convolution on AVX-512 CPUs (src/conv_avx512.cpp), fp32 and bf16, groups == 1.
//
// Tables are destination-major [n_dst, kv] int32 (source row or -1). Each thread owns whole tiles of
// destination rows held in an fp32 accumulator tile; per tile the (row, source) pairs are bucketed by
// tap and fed straight from the feature rows to the register-blocked micro-kernels
// (include/spconv/implicit_gemm.h): no gathered copies, no atomics, bitwise the same on any thread count.
#pragma once
#include <cstdint>

namespace spconv {

bool avx512_conv_available();       // AVX-512 F/BW/VL/DQ (fp32 kernels and bf16 weight gradients)
bool avx512_bf16_conv_available();  // bf16 forward / backward-input here: AVX512-BF16 dot products or brgemm

// Destination rows per tile of the implicit-GEMM kernels for ldc accumulator columns (from the L1d size).
int64_t implicit_gemm_tile_rows(int64_t ldc);

// dst[j] = sum_r W_r^T src[table[j, r]]: packed weights w[r][cs][ldw] (fp32, ldw = cd rounded up to 16,
// zero padded); dst [n_dst, cd] row-major.
void avx512_conv_fp32(const float* src, int64_t cs, const int32_t* table, int64_t n_dst, int64_t kv,
                      const float* w, int64_t ldw, int64_t cd, float* dst);

// Same for bf16 features: w[r][ceil(cs / 2)][ldw][2] bf16 (pairs of source channels interleaved, zero
// padded), fp32 accumulation, dst rounded to bf16.
void avx512_conv_bf16(const uint16_t* src, int64_t cs, const int32_t* table, int64_t n_dst, int64_t kv,
                      const uint16_t* w, int64_t ldw, int64_t cd, uint16_t* dst);

// dw[r][i][o] = sum_j src[table[j, r]][i] * dout[j][o] in fp32, dw zero-initialised by the caller;
// src [*, cin], dout [n_dst, cout]. Per-thread partial sums reduced in thread order.
void avx512_conv_weight_grad_fp32(const float* src, int64_t cin, const int32_t* table, int64_t n_dst, int64_t kv,
                                  const float* dout, int64_t cout, float* dw);
void avx512_conv_weight_grad_bf16(const uint16_t* src, int64_t cin, const int32_t* table, int64_t n_dst,
                                  int64_t kv, const uint16_t* dout, int64_t cout, float* dw);

}  // namespace spconv
