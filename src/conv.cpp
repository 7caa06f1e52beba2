// Sparse convolution kernels on the CPU, driven by a destination-major neighbour table.
//
//   gather_conv:             dst[j] = sum_r W_r  @ src[table[j, r]]   (forward; W_r = weight[:, r, :])
//                            dst[j] = sum_r W_r^T @ src[table[j, r]]  (transpose_weight: backward-input)
//   gather_conv_weight_grad: dW_r   = sum_j dout[j]^T src[table[j, r]]
//
// Each thread owns whole tiles of destination rows: it gathers the neighbours of one tap into a
// cache-resident panel, multiplies it by that tap's weight and accumulates into an fp32 (fp64)
// tile, so there are no atomics and results are bitwise reproducible for a given thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "spconv/bf16_gemm.h"
#include "spconv/checks.h"
#include "spconv/conv_avx512.h"
#include "spconv/tile_gemm.h"

namespace spconv {
namespace {

constexpr int64_t kTileRows = 256;

template <typename acc_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

template <typename scalar_t>
at::Tensor gather_conv_typed(const at::Tensor& src_in, const at::Tensor& table, const at::Tensor& weight,
                             int64_t groups, bool transpose_weight) {
  using acc_t = typename AccType<scalar_t>::type;
  const at::Tensor src = src_in.contiguous();
  const int64_t n_dst = table.size(0), kv = table.size(1);
  const int64_t c_out = weight.size(0), c_in_g = weight.size(2), c_out_g = c_out / groups;
  // packed[r][g] is the [C_src_g, C_dst_g] right-hand matrix of tap r, group g.
  at::Tensor w = weight.to(c10::CppTypeToScalarType<acc_t>::value).view({groups, c_out_g, kv, c_in_g});
  at::Tensor packed = (transpose_weight ? w.permute({2, 0, 1, 3}) : w.permute({2, 0, 3, 1})).contiguous();
  const int64_t cs_g = transpose_weight ? c_out_g : c_in_g;
  const int64_t cd_g = transpose_weight ? c_in_g : c_out_g;
  const int64_t cs = cs_g * groups, cd = cd_g * groups;
  TORCH_CHECK_VALUE(src.size(1) == cs, "spconv: features have ", src.size(1), " channels, expected ", cs);

  at::Tensor dst = at::empty({n_dst, cd}, src.options());
  const scalar_t* sp = src.data_ptr<scalar_t>();
  const int32_t* tp = table.data_ptr<int32_t>();
  const acc_t* wp = packed.data_ptr<acc_t>();
  scalar_t* dp = dst.data_ptr<scalar_t>();
  const int64_t n_tiles = (n_dst + kTileRows - 1) / kTileRows;

  at::parallel_for(0, n_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<acc_t> acc(kTileRows * cd), panel(kTileRows * cs), part(kTileRows * cd);
    std::vector<int32_t> rows(kTileRows);
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t j0 = tile * kTileRows, tm = std::min(kTileRows, n_dst - j0);
      std::fill(acc.begin(), acc.begin() + tm * cd, acc_t(0));
      for (int64_t r = 0; r < kv; ++r) {
        int64_t m = 0;
        for (int64_t t = 0; t < tm; ++t) {
          const int32_t s = tp[(j0 + t) * kv + r];
          if (s < 0) continue;
          const scalar_t* srow = sp + int64_t(s) * cs;
          acc_t* prow = panel.data() + m * cs;
          for (int64_t c = 0; c < cs; ++c) prow[c] = static_cast<acc_t>(srow[c]);
          rows[m++] = static_cast<int32_t>(t);
        }
        if (m == 0) continue;
        const bool dense = (m == tm);  // every row has this tap: accumulate in place
        acc_t* target = dense ? acc.data() : part.data();
        for (int64_t g = 0; g < groups; ++g) {
          tile_gemm(m, cd_g, cs_g, panel.data() + g * cs_g, cs, wp + (r * groups + g) * cs_g * cd_g, cd_g,
                    target + g * cd_g, cd, dense);
        }
        if (!dense) {
          for (int64_t i = 0; i < m; ++i) {
            acc_t* arow = acc.data() + int64_t(rows[i]) * cd;
            const acc_t* prow = part.data() + i * cd;
            for (int64_t c = 0; c < cd; ++c) arow[c] += prow[c];
          }
        }
      }
      scalar_t* out = dp + j0 * cd;
      for (int64_t e = 0; e < tm * cd; ++e) out[e] = static_cast<scalar_t>(acc[e]);
    }
  });
  return dst;
}

// bf16 right-hand matrices mat [K, G, C_src_g, C_dst_g] for the dot-product kernels: [K, G, kp / 2, np, 2],
// source channels in interleaved pairs (kp = C_src_g rounded up to even, np = C_dst_g to a multiple of 16),
// zero padded.
at::Tensor pack_bf16_pairs(const at::Tensor& mat) {
  const int64_t kv = mat.size(0), groups = mat.size(1), cs = mat.size(2), cd = mat.size(3);
  const int64_t kp = (cs + 1) / 2 * 2, np = (cd + 15) / 16 * 16;
  at::Tensor padded = at::zeros({kv, groups, kp, np}, mat.options());
  padded.narrow(2, 0, cs).narrow(3, 0, cd).copy_(mat);
  return padded.view({kv, groups, kp / 2, 2, np}).transpose(3, 4).contiguous();
}

#ifdef SPCONV_HAS_BF16_KERNEL
// bf16 features and weights on a CPU with AVX512-BF16: the panels stay bf16 (pairs of input channels
// per 32-bit lane), products accumulate in fp32 tiles. Same tiling and determinism as the generic path.
at::Tensor gather_conv_bf16(const at::Tensor& src_in, const at::Tensor& table, const at::Tensor& weight,
                            int64_t groups, bool transpose_weight) {
  const at::Tensor src = src_in.contiguous();
  const int64_t n_dst = table.size(0), kv = table.size(1);
  const int64_t c_out = weight.size(0), c_in_g = weight.size(2), c_out_g = c_out / groups;
  const int64_t cs_g = transpose_weight ? c_out_g : c_in_g;
  const int64_t cd_g = transpose_weight ? c_in_g : c_out_g;
  const int64_t cs = cs_g * groups, cd = cd_g * groups;
  TORCH_CHECK_VALUE(src.size(1) == cs, "spconv: features have ", src.size(1), " channels, expected ", cs);
  const int64_t kp = (cs_g + 1) / 2 * 2, np = (cd_g + 15) / 16 * 16;
  at::Tensor w = weight.view({groups, c_out_g, kv, c_in_g});
  at::Tensor packed = pack_bf16_pairs(transpose_weight ? w.permute({2, 0, 1, 3}) : w.permute({2, 0, 3, 1}));

  at::Tensor dst = at::empty({n_dst, cd}, src.options());
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(src.data_ptr<at::BFloat16>());
  const int32_t* tp = table.data_ptr<int32_t>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  at::BFloat16* dp = dst.data_ptr<at::BFloat16>();
  const int64_t n_tiles = (n_dst + kTileRows - 1) / kTileRows;
  const int64_t ldp = groups * kp;  // panel row: each group's channels padded to an even count

  at::parallel_for(0, n_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<float> acc(kTileRows * cd), part(kTileRows * cd);
    std::vector<uint16_t> panel(kTileRows * ldp, 0);
    std::vector<int32_t> rows(kTileRows);
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t j0 = tile * kTileRows, tm = std::min(kTileRows, n_dst - j0);
      std::fill(acc.begin(), acc.begin() + tm * cd, 0.f);
      for (int64_t r = 0; r < kv; ++r) {
        int64_t m = 0;
        for (int64_t t = 0; t < tm; ++t) {
          const int32_t s = tp[(j0 + t) * kv + r];
          if (s < 0) continue;
          const uint16_t* srow = sp + int64_t(s) * cs;
          uint16_t* prow = panel.data() + m * ldp;
          for (int64_t g = 0; g < groups; ++g)
            std::copy(srow + g * cs_g, srow + (g + 1) * cs_g, prow + g * kp);
          rows[m++] = static_cast<int32_t>(t);
        }
        if (m == 0) continue;
        const bool dense = (m == tm);
        float* target = dense ? acc.data() : part.data();
        for (int64_t g = 0; g < groups; ++g) {
          bf16_tile_gemm(m, cd_g, kp, panel.data() + g * kp, ldp, wp + (r * groups + g) * kp * np, np,
                         target + g * cd_g, cd, dense);
        }
        if (!dense) {
          for (int64_t i = 0; i < m; ++i) {
            float* arow = acc.data() + int64_t(rows[i]) * cd;
            const float* prow = part.data() + i * cd;
            for (int64_t c = 0; c < cd; ++c) arow[c] += prow[c];
          }
        }
      }
      at::BFloat16* out = dp + j0 * cd;
      for (int64_t e = 0; e < tm * cd; ++e) out[e] = static_cast<at::BFloat16>(acc[e]);
    }
  });
  return dst;
}
#endif

// groups == 1, fp32 or bf16 on an AVX-512 CPU: the implicit-GEMM kernels of conv_avx512.cpp.
at::Tensor implicit_gemm_conv(const at::Tensor& src_in, const at::Tensor& table, const at::Tensor& weight,
                              bool transpose_weight) {
  const at::Tensor src = src_in.contiguous();
  const int64_t n_dst = table.size(0), kv = table.size(1);
  // mat[r] is the [C_src, C_dst] matrix of tap r
  const at::Tensor mat = transpose_weight ? weight.permute({1, 0, 2}) : weight.permute({1, 2, 0});
  const int64_t cs = mat.size(1), cd = mat.size(2), ldw = (cd + 15) / 16 * 16;
  TORCH_CHECK_VALUE(src.size(1) == cs, "spconv: features have ", src.size(1), " channels, expected ", cs);
  at::Tensor dst = at::empty({n_dst, cd}, src.options());
  if (n_dst == 0) return dst;
  const int32_t* tp = table.data_ptr<int32_t>();
  if (src.scalar_type() == at::kFloat) {
    at::Tensor packed = at::zeros({kv, cs, ldw}, weight.options());
    packed.narrow(2, 0, cd).copy_(mat);
    avx512_conv_fp32(src.data_ptr<float>(), cs, tp, n_dst, kv, packed.data_ptr<float>(), ldw, cd,
                     dst.data_ptr<float>());
  } else {
    const at::Tensor packed = pack_bf16_pairs(mat.unsqueeze(1));  // [r][1][kp / 2][ldw][2]
    avx512_conv_bf16(reinterpret_cast<const uint16_t*>(src.data_ptr<at::BFloat16>()), cs, tp, n_dst, kv,
                     reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()), ldw, cd,
                     reinterpret_cast<uint16_t*>(dst.data_ptr<at::BFloat16>()));
  }
  return dst;
}

at::Tensor gather_conv(const at::Tensor& src_in, const at::Tensor& table_in, const at::Tensor& weight_in,
                       int64_t groups, bool transpose_weight) {
  const char* op = "gather_conv";
  const at::Tensor src = check_features(src_in, op, "features");
  const at::Tensor table = check_int32_2d(table_in, op, "table");
  check_cpu(weight_in, op, "weight");
  TORCH_CHECK_TYPE(weight_in.scalar_type() == src.scalar_type(), "spconv.gather_conv: features are ", src.scalar_type(),
                   " but weight is ", weight_in.scalar_type(), "; cast one to the other's dtype");
  TORCH_CHECK_VALUE(weight_in.dim() == 3, "spconv.gather_conv: weight must be 3-D [C_out, K, C_in/groups], got shape ",
                    weight_in.sizes());
  TORCH_CHECK_VALUE(weight_in.size(1) == table.size(1), "spconv.gather_conv: weight has ", weight_in.size(1),
                    " kernel taps (weight.size(1)) but the table has ", table.size(1),
                    " columns; the table must come from a kernel map of the same kernel size");
  TORCH_CHECK_VALUE(groups >= 1 && weight_in.size(0) % groups == 0, "spconv.gather_conv: groups must be >= 1 and divide C_out = ",
                    weight_in.size(0), ", got groups=", groups);
  const at::Tensor weight = weight_in.contiguous();
  const int64_t c_src = transpose_weight ? weight.size(0) : groups * weight.size(2);
  TORCH_CHECK_VALUE(src.size(1) == c_src, "spconv.gather_conv: features have ", src.size(1), " channels but weight ",
                    weight.sizes(), " with groups=", groups, (transpose_weight ? " (transposed)" : ""), " expects ", c_src);
  check_entries(table, -1, src.size(0), op, "table",
                "-1 (no neighbour) or a row of features (" + std::to_string(src.size(0)) +
                    " rows); the table was built for other sites than these features");
  if (groups == 1 && src.scalar_type() == at::kFloat && avx512_conv_available())
    return implicit_gemm_conv(src, table, weight, transpose_weight);
  if (groups == 1 && src.scalar_type() == at::kBFloat16 && avx512_bf16_conv_available())
    return implicit_gemm_conv(src, table, weight, transpose_weight);
#ifdef SPCONV_HAS_BF16_KERNEL
  if (src.scalar_type() == at::kBFloat16 && cpu_has_avx512_bf16())
    return gather_conv_bf16(src, table, weight, groups, transpose_weight);
#endif
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "spconv_gather_conv", [&] {
    out = gather_conv_typed<scalar_t>(src, table, weight, groups, transpose_weight);
  });
  return out;
}

template <typename scalar_t>
at::Tensor gather_conv_weight_grad_typed(const at::Tensor& src_in, const at::Tensor& table,
                                         const at::Tensor& dout_in, int64_t groups) {
  using acc_t = typename AccType<scalar_t>::type;
  const at::Tensor src = src_in.contiguous(), dout = dout_in.contiguous();
  const int64_t n_dst = table.size(0), kv = table.size(1);
  const int64_t c_in = src.size(1), c_out = dout.size(1);
  const int64_t c_in_g = c_in / groups, c_out_g = c_out / groups;
  const scalar_t* sp = src.data_ptr<scalar_t>();
  const scalar_t* gp = dout.data_ptr<scalar_t>();
  const int32_t* tp = table.data_ptr<int32_t>();
  const int64_t n_tiles = (n_dst + kTileRows - 1) / kTileRows;

  // One partial dW per worker over a fixed split of the tiles, summed in worker order: deterministic.
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tiles));
  const int64_t wsize = kv * groups * c_out_g * c_in_g;
  std::vector<acc_t> partial(workers * wsize, acc_t(0));
  at::parallel_for(0, workers, 1, [&](int64_t wb, int64_t we) {
    std::vector<acc_t> dpanel(c_out * kTileRows), spanel(kTileRows * c_in);
    std::vector<int32_t> rows(kTileRows);
    for (int64_t w = wb; w < we; ++w) {
      acc_t* pw = partial.data() + w * wsize;
      const int64_t t0 = n_tiles * w / workers, t1 = n_tiles * (w + 1) / workers;
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t j0 = tile * kTileRows, tm = std::min(kTileRows, n_dst - j0);
        for (int64_t r = 0; r < kv; ++r) {
          int64_t m = 0;
          for (int64_t t = 0; t < tm; ++t) {
            const int32_t s = tp[(j0 + t) * kv + r];
            if (s < 0) continue;
            const scalar_t* srow = sp + int64_t(s) * c_in;
            acc_t* prow = spanel.data() + m * c_in;
            for (int64_t c = 0; c < c_in; ++c) prow[c] = static_cast<acc_t>(srow[c]);
            rows[m++] = static_cast<int32_t>(t);
          }
          if (m == 0) continue;
          // dout rows, transposed into [C_out, m], 16 rows at a time so each write is a full line
          for (int64_t i0 = 0; i0 < m; i0 += 16) {
            const int64_t ib = std::min<int64_t>(16, m - i0);
            const scalar_t* drows[16];
            for (int64_t i = 0; i < ib; ++i) drows[i] = gp + (j0 + rows[i0 + i]) * c_out;
            for (int64_t c = 0; c < c_out; ++c) {
              acc_t* dcol = dpanel.data() + c * kTileRows + i0;
              for (int64_t i = 0; i < ib; ++i) dcol[i] = static_cast<acc_t>(drows[i][c]);
            }
          }
          for (int64_t g = 0; g < groups; ++g) {
            tile_gemm(c_out_g, c_in_g, m, dpanel.data() + g * c_out_g * kTileRows, kTileRows,
                      spanel.data() + g * c_in_g, c_in, pw + (r * groups + g) * c_out_g * c_in_g, c_in_g, true);
          }
        }
      }
    }
  });
  for (int64_t w = 1; w < workers; ++w) {
    const acc_t* pw = partial.data() + w * wsize;
    for (int64_t e = 0; e < wsize; ++e) partial[e] += pw[e];
  }
  at::Tensor sum = at::from_blob(partial.data(), {kv, groups, c_out_g, c_in_g},
                                 at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  // [K, G, C_out_g, C_in_g] -> [C_out, K, C_in_g]
  at::Tensor out = at::empty({c_out, kv, c_in_g}, src.options());
  out.view({groups, c_out_g, kv, c_in_g}).copy_(sum.permute({1, 2, 0, 3}));
  return out;
}

at::Tensor gather_conv_weight_grad(const at::Tensor& src_in, const at::Tensor& table_in, const at::Tensor& dout_in,
                                   int64_t groups) {
  const char* op = "gather_conv_weight_grad";
  const at::Tensor src = check_features(src_in, op, "features");
  const at::Tensor table = check_int32_2d(table_in, op, "table");
  const at::Tensor dout = check_features(dout_in, op, "out_grad");
  TORCH_CHECK_VALUE(dout.size(0) == table.size(0), "spconv.gather_conv_weight_grad: out_grad has ", dout.size(0),
                    " rows but the table has ", table.size(0), "; it needs one gradient row per table row (output site)");
  TORCH_CHECK_TYPE(src.scalar_type() == dout.scalar_type(), "spconv.gather_conv_weight_grad: features are ",
                   src.scalar_type(), " but out_grad is ", dout.scalar_type(), "; cast one to the other's dtype");
  TORCH_CHECK_VALUE(groups >= 1 && src.size(1) % groups == 0 && dout.size(1) % groups == 0,
                    "spconv.gather_conv_weight_grad: groups must be >= 1 and divide both channel counts (features ",
                    src.size(1), ", out_grad ", dout.size(1), "), got groups=", groups);
  check_entries(table, -1, src.size(0), op, "table",
                "-1 (no neighbour) or a row of features (" + std::to_string(src.size(0)) +
                    " rows); the table was built for other sites than these features");
  const bool fp32 = src.scalar_type() == at::kFloat, bf16 = src.scalar_type() == at::kBFloat16;
  if (groups == 1 && (fp32 || bf16) && avx512_conv_available()) {
    const at::Tensor s = src.contiguous(), d = dout.contiguous();
    const int64_t kv = table.size(1), c_in = s.size(1), c_out = d.size(1);
    at::Tensor dw = at::empty({kv, c_in, c_out}, src.options().dtype(at::kFloat));  // [K, C_in, C_out]
    if (fp32) {
      avx512_conv_weight_grad_fp32(s.data_ptr<float>(), c_in, table.data_ptr<int32_t>(), table.size(0), kv,
                                   d.data_ptr<float>(), c_out, dw.data_ptr<float>());
    } else {
      avx512_conv_weight_grad_bf16(reinterpret_cast<const uint16_t*>(s.data_ptr<at::BFloat16>()), c_in,
                                   table.data_ptr<int32_t>(), table.size(0), kv,
                                   reinterpret_cast<const uint16_t*>(d.data_ptr<at::BFloat16>()), c_out,
                                   dw.data_ptr<float>());
    }
    at::Tensor out = at::empty({c_out, kv, c_in}, src.options());  // [C_out, K, C_in]
    out.copy_(dw.permute({2, 0, 1}));
    return out;
  }
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "spconv_conv_weight_grad", [&] {
    out = gather_conv_weight_grad_typed<scalar_t>(src, table, dout, groups);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spconv, m) {
  m.def("gather_conv(Tensor features, Tensor table, Tensor weight, int groups, bool transpose_weight) -> Tensor");
  m.def("gather_conv_weight_grad(Tensor features, Tensor table, Tensor out_grad, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(spconv, CPU, m) {
  m.impl("gather_conv", &gather_conv);
  m.impl("gather_conv_weight_grad", &gather_conv_weight_grad);
}

}  // namespace spconv
