"""The Triton backend (spconv.triton) against the compiled CPU ops and against dense PyTorch.

No GPU here: every kernel runs on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py before triton is imported), which is slow, so the inputs are small.
"""
import collections
import types

import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton, or spconv[gpu]): the "
                                              "Triton backend cannot be tested")
if not triton.knobs.runtime.interpret:
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: run test/triton in its own pytest process "
                "(TRITON_INTERPRET=1 python -m pytest test/triton)", allow_module_level=True)

import spconv.pytorch as spconv  # noqa: E402
import spconv.triton as T  # noqa: E402
from spconv import constants  # noqa: E402
from spconv.pytorch import ops  # noqa: E402
from spconv.triton import _runtime, dispatch  # noqa: E402
from spconv.triton import conv as tconv  # noqa: E402
from helpers import (dense_conv, dense_conv_transpose, gather_sites, random_sparse, to_dense,  # noqa: E402
                     torch_conv_t_weight, torch_conv_weight)

SHAPES = {1: [23], 2: [9, 11], 3: [7, 8, 6], 4: [4, 5, 4, 5]}
FUNCTIONS = ("build_subm_map", "build_conv_map", "invert_map", "gather_conv", "gather_conv_weight_grad")
POOL_FUNCTIONS = ("maxpool_forward", "maxpool_backward", "active_counts", "avgpool_forward", "avgpool_backward")


def _vec(v, nd):
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)] * nd


def _out_shape(shape, k, s, p, d, transposed):
    if transposed:
        return ops.get_deconv_output_size(shape, k, s, p, d, [0] * len(shape))
    return ops.get_conv_output_size(shape, k, s, p, d)


def _pairs(out_indices, in_indices, nbr):
    """The map as a set of (output site, tap, input site): independent of row order."""
    j, r = (nbr >= 0).nonzero(as_tuple=True)
    outs = out_indices[j].tolist()
    ins = in_indices[nbr[j, r].long()].tolist()
    return {(tuple(o), t, tuple(i)) for o, t, i in zip(outs, r.tolist(), ins)}


# ------------------------------------------------------------------------------------------------
# kernel maps: equal to the CPU maps as sets of pairs (and the same sorted output sites)

SUBM_MAP_CASES = [(1, 3, 1), (1, 3, 2), (2, 1, 1), (2, 3, 2), (3, 3, 1), (3, (3, 1, 5), 2), (4, 3, 1)]


@pytest.mark.parametrize("nd,k,d", SUBM_MAP_CASES)
def test_subm_map_equals_cpu(nd, k, d):
    shape = SHAPES[nd]
    _, idx = random_sparse(shape, 2 if nd < 4 else 1, 0.3, 1, seed=nd)
    k, d = _vec(k, nd), _vec(d, nd)
    got = T.build_subm_map(idx, shape, k, d)
    ref = ops.build_subm_map(idx, shape, k, d)
    assert got.dtype == torch.int32 and got.shape == ref.shape
    assert _pairs(idx, idx, got) == _pairs(idx, idx, ref)


CONV_MAP_CASES = [  # nd, kernel, stride, padding, dilation, transposed
    (1, 2, 2, 0, 1, False), (1, 3, 1, 2, 2, False), (2, 3, 2, 1, 1, False), (2, 2, 2, 0, 1, True),
    (2, 3, 2, 1, 1, True), (3, 3, 2, 1, 1, False), (3, (3, 1, 2), (2, 1, 2), (0, 0, 1), 1, False),
    (3, 3, 1, 0, 2, False), (3, 3, 2, 1, 1, True), (4, 2, 2, 0, 1, False), (4, 3, 2, 1, 1, False),
]


@pytest.mark.parametrize("nd,k,s,p,d,transposed", CONV_MAP_CASES)
def test_conv_map_equals_cpu(nd, k, s, p, d, transposed):
    shape = SHAPES[nd]
    _, idx = random_sparse(shape, 2 if nd < 4 else 1, 0.25, 1, seed=7 * nd + _vec(s, nd)[0])
    k, s, p, d = (_vec(v, nd) for v in (k, s, p, d))
    out_shape = _out_shape(shape, k, s, p, d, transposed)
    out_idx, nbr = T.build_conv_map(idx, shape, out_shape, k, s, p, d, transposed)
    ref_idx, ref_nbr = ops.build_conv_map(idx, shape, out_shape, k, s, p, d, transposed)
    assert out_idx.dtype == torch.int32 and nbr.dtype == torch.int32
    assert torch.equal(out_idx, ref_idx)  # both sorted by (batch, coords)
    assert _pairs(out_idx, idx, nbr) == _pairs(ref_idx, idx, ref_nbr)
    inv = T.invert_map(nbr, idx.shape[0])
    assert torch.equal(inv, ops.invert_map(ref_nbr, idx.shape[0]))


def test_maps_with_int64_keys():
    """A grid of 3000^3 x 2 batches: keys pass 2^31 and must not wrap."""
    shape = [3000, 3000, 3000]
    idx = torch.tensor([[1, 2999, 2999, 2999], [1, 2998, 2999, 2999], [1, 2999, 2998, 2997], [0, 0, 0, 0],
                        [0, 1, 1, 1], [1, 0, 0, 1], [0, 2999, 2999, 2999]], dtype=torch.int32)
    got = T.build_subm_map(idx, shape, [3] * 3, [1] * 3)
    assert _pairs(idx, idx, got) == _pairs(idx, idx, ops.build_subm_map(idx, shape, [3] * 3, [1] * 3))
    args = (shape, [1500] * 3, [3] * 3, [2] * 3, [1] * 3, [1] * 3, False)
    out_idx, nbr = T.build_conv_map(idx, *args)
    ref_idx, ref_nbr = ops.build_conv_map(idx, *args)
    assert torch.equal(out_idx, ref_idx)
    assert _pairs(out_idx, idx, nbr) == _pairs(ref_idx, idx, ref_nbr)


def test_maps_of_empty_inputs():
    idx = torch.zeros((0, 4), dtype=torch.int32)
    assert T.build_subm_map(idx, [5, 5, 5], [3] * 3, [1] * 3).shape == (0, 27)
    out_idx, nbr = T.build_conv_map(idx, [5, 5, 5], [3, 3, 3], [3] * 3, [2] * 3, [1] * 3, [1] * 3, False)
    assert out_idx.shape == (0, 4) and nbr.shape == (0, 27)
    assert T.invert_map(nbr, 4).tolist() == [[-1] * 27] * 4


def test_duplicate_sites_raise():
    idx = torch.tensor([[0, 1, 1], [0, 2, 2], [0, 1, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="duplicate sites"):
        T.build_subm_map(idx, [4, 4], [3, 3], [1, 1])
    with pytest.raises(ValueError, match="duplicate sites"):
        T.build_conv_map(idx, [4, 4], [2, 2], [2, 2], [2, 2], [0, 0], [1, 1], False)


def test_bad_indices_raise():
    with pytest.raises(ValueError, match="int32"):
        T.build_subm_map(torch.zeros((3, 4), dtype=torch.int64), [4, 4, 4], [3] * 3, [1] * 3)


# ------------------------------------------------------------------------------------------------
# conv kernels against the CPU kernels

def _tables(seed=0):
    """A SubM 3x3x3 table (dense centre tap) and a strided table with many empty taps, on ~100 sites."""
    shape = [7, 8, 6]
    _, idx = random_sparse(shape, 2, 0.15, 1, seed=seed)
    subm = ops.build_subm_map(idx, shape, [3] * 3, [1] * 3)
    out_idx, strided = ops.build_conv_map(idx, shape, [4, 4, 3], [3] * 3, [2] * 3, [1] * 3, [1] * 3, False)
    return idx.shape[0], subm, strided


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}

KERNEL_CASES = [(torch.float32, 1, 3, 17), (torch.float32, 1, 17, 3), (torch.float32, 2, 6, 34),
                (torch.float32, 3, 9, 6), (torch.float16, 1, 17, 3), (torch.float16, 2, 34, 6),
                (torch.bfloat16, 1, 3, 17), (torch.bfloat16, 3, 9, 6), (torch.float64, 1, 17, 3)]


@pytest.mark.parametrize("dtype,groups,cin,cout", KERNEL_CASES)
def test_conv_kernels_equal_cpu(dtype, groups, cin, cout):
    n_in, subm, strided = _tables(seed=cin)
    g = torch.Generator().manual_seed(cin * 7 + cout)
    for table, n_src in ((subm, n_in), (strided, n_in)):
        kv = table.shape[1]
        x = torch.randn(n_src, cin, generator=g).to(dtype)
        w = (torch.randn(cout, kv, cin // groups, generator=g) * 0.3).to(dtype)
        dy = torch.randn(table.shape[0], cout, generator=g).to(dtype)
        torch.testing.assert_close(T.gather_conv(x, table, w, groups, False), ops.gather_conv(x, table, w, groups, False),
                                   **TOL[dtype])
        inv = ops.invert_map(table, n_src)  # backward-input: source = output gradient, W transposed
        torch.testing.assert_close(T.gather_conv(dy, inv, w, groups, True), ops.gather_conv(dy, inv, w, groups, True),
                                   **TOL[dtype])
        ref = ops.gather_conv_weight_grad(x, table, dy, groups)
        for splits in ((None, 3) if dtype == torch.float32 else (None,)):
            got = tconv.gather_conv_weight_grad(x, table, dy, groups, splits=splits)
            assert got.dtype == dtype and got.shape == (cout, kv, cin // groups)
            torch.testing.assert_close(got, ref, **TOL[dtype])


@pytest.mark.parametrize("weight_grad", [False, True], ids=["gather_conv", "weight_grad"])
def test_every_gpu_autotune_config(weight_grad):
    """The interpreter autotunes over one config; run each GPU config's block sizes directly."""
    shape = [9, 11]
    _, idx = random_sparse(shape, 2, 0.4, 1, seed=3)
    n_in, subm = idx.shape[0], ops.build_subm_map(idx, shape, [3, 3], [1, 1])
    g = torch.Generator().manual_seed(0)
    cin, cout = 33, 70  # several channel blocks, with tails, for every block width
    x = torch.randn(n_in, cin, generator=g)
    w = torch.randn(cout, 9, cin, generator=g) * 0.2
    dy = torch.randn(n_in, cout, generator=g)
    ref = ops.gather_conv_weight_grad(x, subm, dy, 1) if weight_grad else ops.gather_conv(x, subm, w, 1, False)
    for config in tconv.autotune_configs(weight_grad):
        if weight_grad:
            got = tconv.gather_conv_weight_grad(x, subm, dy, 1, config=config, splits=2)
        else:
            got = tconv.gather_conv(x, subm, w, 1, False, config=config)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{config}: {m}")


def test_tf32_is_opt_in(monkeypatch):
    assert tconv._dot_flags(torch.float32)[0] == "ieee"
    assert tconv._dot_flags(torch.float16)[0] == "ieee"
    monkeypatch.setattr(constants, "SPCONV_ALLOW_TF32", True)
    assert tconv._dot_flags(torch.float32)[0] == "tf32"
    n_in, subm, _ = _tables()
    x, w = torch.randn(n_in, 5), torch.randn(4, 27, 5)
    torch.testing.assert_close(T.gather_conv(x, subm, w, 1, False), ops.gather_conv(x, subm, w, 1, False),
                               rtol=1e-5, atol=1e-5)  # the interpreter computes in fp32 whatever the precision


def test_conv_kernels_on_empty_and_bad_input():
    table = torch.zeros((0, 27), dtype=torch.int32)
    assert T.gather_conv(torch.randn(5, 3), table, torch.randn(4, 27, 3), 1, False).shape == (0, 4)
    assert T.gather_conv_weight_grad(torch.randn(5, 3), table, torch.randn(0, 4), 1).abs().sum() == 0
    table = torch.full((2, 27), -1, dtype=torch.int32)
    assert T.gather_conv(torch.zeros(0, 3), table, torch.randn(4, 27, 3), 1, False).abs().sum() == 0
    with pytest.raises(TypeError, match="float32"):
        T.gather_conv(torch.ones(2, 3, dtype=torch.int32), table, torch.ones(4, 27, 3, dtype=torch.int32), 1, False)
    with pytest.raises(ValueError, match="weight is"):
        T.gather_conv(torch.randn(2, 3), table, torch.randn(4, 27, 3, dtype=torch.float64), 1, False)
    with pytest.raises(ValueError, match="neighbour table on meta"):  # e.g. CUDA features with a CPU-built map
        T.gather_conv(torch.randn(2, 3), table.to("meta"), torch.randn(4, 27, 3), 1, False)
    with pytest.raises(ValueError, match="neighbour table on meta"):
        T.gather_conv_weight_grad(torch.randn(2, 3), table.to("meta"), torch.randn(2, 4), 1)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(_runtime, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        T.build_subm_map(torch.zeros((1, 4), dtype=torch.int32), [2, 2, 2], [3] * 3, [1] * 3)


# ------------------------------------------------------------------------------------------------
# what the sequential interpreter hides: device guard, grid limits, full hash tables, block-size choice, bf16

def test_launches_on_the_tensors_device(monkeypatch):
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(_runtime.torch.cuda, "device", Recorder)
    with _runtime.device_guard(types.SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _runtime.device_guard(torch.zeros(1)):  # CPU tensors (interpreter): no CUDA call
        pass
    assert len(entered) == 1
    for name in FUNCTIONS + POOL_FUNCTIONS:  # every entry point launches under the guard of its first tensor
        assert getattr(getattr(T, name), "device_guarded", False), name


def test_grids_are_one_dimensional():
    """CUDA caps grid axes 1 and 2 at 65535: taps x groups and groups are folded into axis 0."""
    meta = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16)
    assert tconv.gather_grid(1000, 16, 70000, meta) == (32 * 70000,)
    assert tconv.weight_grad_grid(16, 16, 27, 4096, 3, meta) == (27 * 4096 * 3,)
    with pytest.raises(ValueError, match="2\\^31"):
        tconv.gather_grid(2 ** 30, 16, 64, meta)


def test_grouped_kernels_fold_every_axis():
    """Many groups, taps and row slices at once: every (tile, tap, group, slice) program lands on its own tile."""
    n_in, subm, _ = _tables(seed=5)
    g = torch.Generator().manual_seed(5)
    groups, cin, cout = 8, 16, 40
    x = torch.randn(n_in, cin, generator=g)
    w = torch.randn(cout, 27, cin // groups, generator=g)
    dy = torch.randn(n_in, cout, generator=g)
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    torch.testing.assert_close(tconv.gather_conv(x, subm, w, groups, False, config=config),
                               ops.gather_conv(x, subm, w, groups, False), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tconv.gather_conv_weight_grad(x, subm, dy, groups, config=config, splits=3),
                               ops.gather_conv_weight_grad(x, subm, dy, groups), rtol=1e-5, atol=1e-5)


def test_full_hash_table_raises(monkeypatch):
    from spconv.triton import map_kernels as km
    # the kernel alone: 40 distinct keys into 16 slots give up after probing every slot, and flag it
    idx = torch.stack([torch.zeros(40, dtype=torch.int32), torch.arange(40, dtype=torch.int32)], 1)
    geo = _runtime.geometry(idx.device, 1, [64], [64], [3], [1], [1], [1])
    keys = torch.full((16,), -1, dtype=torch.int64)
    vals = torch.full((16,), -1, dtype=torch.int32)
    status = km._new_status(idx.device)
    km._insert_sites_kernel[(1,)](idx, geo, keys, vals, status, 40, 15, NDIM=1, BLOCK=64)
    assert status.tolist()[1] == 1 and (keys >= 0).all()
    # the builders: a clear error instead of a hang
    monkeypatch.setattr(km, "_capacity", lambda entries: 16)
    with pytest.raises(RuntimeError, match="hash table .* is full"):
        T.build_subm_map(idx, [64], [3], [1])
    with pytest.raises(RuntimeError, match="hash table .* is full"):
        T.build_conv_map(idx[:12] * 5, [64], [64], [3], [1], [1], [1], False)  # 12 sites fit, their 36 outputs not
    small = idx[:6]
    assert torch.equal(T.build_subm_map(small, [64], [3], [1]), ops.build_subm_map(small, [64], [3], [1]))


def test_one_host_read_per_map(monkeypatch):
    """Duplicates, a full table and the output count come back in one status read per map build."""
    reads = collections.Counter()
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__"):
        def counted(self, *args, _fn=getattr(torch.Tensor, name), _name=name, **kwargs):
            reads[_name] += 1
            return _fn(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    shape = [7, 8, 6]
    _, idx = random_sparse(shape, 2, 0.2, 1, seed=9)
    T.build_subm_map(idx, shape, [3] * 3, [1] * 3)
    assert sum(reads.values()) == 1, reads
    T.build_conv_map(idx, shape, [4, 4, 3], [3] * 3, [2] * 3, [1] * 3, [1] * 3, False)
    assert sum(reads.values()) == 2, reads


def test_block_sizes_are_pinned_per_shape(monkeypatch):
    """Outside the interpreter the block sizes are a pure function of the channel counts (the same in every
    process: same summation order on every DDP rank), and each is one of the compile-checked configs."""
    monkeypatch.setattr(tconv, "INTERPRET", False)
    monkeypatch.delenv(tconv.AUTOTUNE_ENV, raising=False)
    assert not tconv._autotune()
    for weight_grad in (False, True):
        configs = tconv.autotune_configs(weight_grad)
        for a in (1, 3, 16, 17, 32, 64, 100, 128, 256, 1024):
            for b in (1, 16, 33, 64, 128, 512):
                cfg = tconv.pinned_config(weight_grad, a, b)
                assert cfg == tconv.pinned_config(weight_grad, a, b)
                blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
                assert blocks in configs, (weight_grad, a, b, cfg)
    assert tconv.pinned_config(False, 16, 16)["BLOCK_M"] >= 64  # 16-channel layers get tall tiles
    monkeypatch.setenv(tconv.AUTOTUNE_ENV, "1")
    assert tconv._autotune()


def _interpreter_dot_with_bf16(monkeypatch):
    """Triton's interpreter multiplies bf16 dot operands as raw uint16 bits; patch its dot to widen bf16 to fp32
    first (exact: a bf16 product fits fp32), as tensor cores do, so that the kernels' true bf16 path can run."""
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(h):
            if getattr(h.dtype, "scalar", h.dtype) == triton.language.bfloat16:
                return (h.data.astype(np.uint32) << 16).view(np.float32)
            return h.data
        if widen(a) is a.data and widen(b) is b.data:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        return interpreter.TensorHandle(np.matmul(widen(a), widen(b), dtype=d.data.dtype) + d.data, d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_true_reduced_precision_path(monkeypatch, dtype):
    """UPCAST=False: bf16/fp16 tiles go into tl.dot as they are and the output is stored in bf16/fp16 by the
    kernel, as on a GPU (by default the interpreter upcasts bf16 tiles; fp16 never is)."""
    n_in, subm, strided = _tables(seed=11)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n_in, 17, generator=g).to(dtype)
    w = (torch.randn(6, 27, 17, generator=g) * 0.3).to(dtype)
    dy = torch.randn(strided.shape[0], 6, generator=g).to(dtype)
    ref = ops.gather_conv(x, strided, w, 1, False)
    if dtype == torch.bfloat16:
        assert tconv._dot_flags(dtype)[1]  # the default in the interpreter: upcast
        monkeypatch.setattr(tconv, "INTERPRETER_UPCASTS_BF16", False)
        raw = T.gather_conv(x, strided, w, 1, False)  # the interpreter's own bf16 dot: wrong
        assert not torch.allclose(raw.float(), ref.float(), rtol=0.1, atol=0.1)
        _interpreter_dot_with_bf16(monkeypatch)
    assert tconv._dot_flags(dtype)[1] is False
    torch.testing.assert_close(T.gather_conv(x, strided, w, 1, False), ref, **TOL[dtype])
    inv = ops.invert_map(strided, n_in)
    torch.testing.assert_close(T.gather_conv(dy, inv, w, 1, True), ops.gather_conv(dy, inv, w, 1, True), **TOL[dtype])
    got = T.gather_conv_weight_grad(x, strided, dy, 1)
    assert got.dtype == dtype
    torch.testing.assert_close(got, ops.gather_conv_weight_grad(x, strided, dy, 1), **TOL[dtype])


# ------------------------------------------------------------------------------------------------
# dense PyTorch parity, forward and gradients, through a small autograd wrapper of the Triton ops

class _TritonConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, weight, fwd_table, bwd_table, groups):
        ctx.save_for_backward(features, weight, fwd_table, bwd_table)
        ctx.groups = groups
        return T.gather_conv(features, fwd_table, weight.reshape(weight.shape[0], -1, weight.shape[-1]), groups, False)

    @staticmethod
    def backward(ctx, dy):
        features, weight, fwd_table, bwd_table = ctx.saved_tensors
        dy = dy.contiguous()
        w3 = weight.reshape(weight.shape[0], -1, weight.shape[-1])
        dx = T.gather_conv(dy, bwd_table, w3, ctx.groups, True)
        dw = T.gather_conv_weight_grad(features, fwd_table, dy, ctx.groups).view(weight.shape)
        return dx, dw, None, None, None


def _triton_sparse_conv(features, idx, shape, weight, kind, k, s, p, d, groups):
    """(out features, out indices, out shape) of a SubM / regular / transposed / inverse conv on Triton maps."""
    if kind == "subm":
        fwd = T.build_subm_map(idx, shape, k, d)
        return _TritonConv.apply(features, weight, fwd, fwd.flip(1).contiguous(), groups), idx, shape
    if kind == "inverse":  # undo a strided conv of the same geometry: its map, read input-major
        low_shape = _out_shape(shape, k, s, p, d, False)
        low_idx, nbr = T.build_conv_map(idx, shape, low_shape, k, s, p, d, False)
        return low_idx, low_shape, nbr
    out_shape = _out_shape(shape, k, s, p, d, kind == "transposed")
    out_idx, fwd = T.build_conv_map(idx, shape, out_shape, k, s, p, d, kind == "transposed")
    bwd = T.invert_map(fwd, idx.shape[0])
    return _TritonConv.apply(features, weight, fwd, bwd, groups), out_idx, out_shape


DENSE_CASES = [  # nd, kind, kernel, stride, padding, dilation, groups, C_in, C_out
    (1, "subm", 3, 1, 0, 1, 1, 3, 17), (2, "subm", 3, 1, 0, 2, 1, 17, 3), (2, "subm", 1, 1, 0, 1, 1, 4, 5),
    (3, "subm", 3, 1, 0, 1, 2, 6, 4), (4, "subm", 3, 1, 0, 1, 1, 3, 5),
    (1, "conv", 2, 2, 0, 1, 1, 3, 5), (2, "conv", 3, 2, 1, 1, 1, 17, 3), (3, "conv", 3, 2, 1, 1, 1, 4, 6),
    (3, "conv", 2, 1, 0, 2, 3, 6, 9), (3, "conv", (3, 1, 2), (2, 1, 2), (1, 0, 0), 1, 1, 3, 4),
    (4, "conv", 2, 2, 0, 1, 1, 3, 4),
    (2, "transposed", 3, 2, 1, 1, 1, 3, 5), (3, "transposed", 2, 2, 0, 1, 2, 4, 6),
    (3, "inverse", 3, 2, 1, 1, 1, 5, 3),
]


@pytest.mark.parametrize("nd,kind,k,s,p,d,groups,cin,cout", DENSE_CASES)
def test_triton_conv_matches_dense(nd, kind, k, s, p, d, groups, cin, cout):
    shape = SHAPES[nd]
    batch = 2 if nd < 4 else 1
    k, s, p, d = (_vec(v, nd) for v in (k, s, p, d))
    if kind == "subm":
        s, p = [1] * nd, [(kk // 2) * dd for kk, dd in zip(k, d)]
    feats, idx = random_sparse(shape, batch, 0.3, cin, seed=nd * 31 + cin)
    g = torch.Generator().manual_seed(cout)
    weight = torch.rand(cout, *k, cin // groups, generator=g) * 2 - 1

    f_sp = feats.clone().requires_grad_(True)
    w_sp = weight.clone().requires_grad_(True)
    f_dn = feats.clone().requires_grad_(True)
    w_dn = weight.clone().requires_grad_(True)
    if kind == "inverse":
        # the input lives on the strided conv's output sites; the output on that conv's input sites
        low_idx, low_shape, nbr = _triton_sparse_conv(None, idx, shape, None, kind, k, s, p, d, groups)
        low = torch.rand(low_idx.shape[0], cin, generator=g) * 2 - 1
        f_sp = low.clone().requires_grad_(True)
        f_dn = low.clone().requires_grad_(True)
        out = _TritonConv.apply(f_sp, w_sp, T.invert_map(nbr, idx.shape[0]), nbr, groups)
        out_idx = idx
        full = [(lo - 1) * ss - 2 * pp + dd * (kk - 1) + 1 for lo, ss, pp, dd, kk in zip(low_shape, s, p, d, k)]
        op = [sh - f for sh, f in zip(shape, full)]
        x_dense = to_dense(f_dn, low_idx, low_shape, batch)
        ref = dense_conv_transpose(x_dense, torch_conv_t_weight(w_dn, groups), s, p, d, groups, op)
    else:
        out, out_idx, out_shape = _triton_sparse_conv(f_sp, idx, shape, w_sp, kind, k, s, p, d, groups)
        x_dense = to_dense(f_dn, idx, shape, batch)
        if kind == "transposed":
            ref = dense_conv_transpose(x_dense, torch_conv_t_weight(w_dn, groups), s, p, d, groups)
        else:
            ref = dense_conv(x_dense, torch_conv_weight(w_dn), s, p, d, groups)
        assert list(ref.shape[2:]) == list(out_shape)
    ref_sites = gather_sites(ref, out_idx)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref_sites, **tol)
    if kind in ("conv", "transposed"):  # nothing reaches a site outside the active set
        dense_out = to_dense(out.detach(), out_idx, list(ref.shape[2:]), batch)
        torch.testing.assert_close(dense_out, ref.detach(), **tol)
    dy = torch.rand(out.shape, generator=g) - 0.5
    out.backward(dy)
    (ref_sites * dy).sum().backward()
    torch.testing.assert_close(f_sp.grad, f_dn.grad, **tol)
    torch.testing.assert_close(w_sp.grad, w_dn.grad, **tol)


def test_gradcheck_fp64():
    feats, idx = random_sparse([12], 1, 0.5, 2, dtype=torch.float64, seed=1)
    out_idx, fwd = T.build_conv_map(idx, [12], [6], [3], [2], [1], [1], False)
    bwd = T.invert_map(fwd, idx.shape[0])
    w = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    f = feats.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: _TritonConv.apply(a, b, fwd, bwd, 1), (f, w))


# ------------------------------------------------------------------------------------------------
# dispatch: the Triton implementations are the CUDA kernels of torch.ops.spconv.*; triton_on_cpu() makes them
# the CPU kernels too (the one way to run them on CPU tensors)

def test_every_triton_op_has_a_cuda_kernel():
    assert set(dispatch.TRITON_KERNELS) == set(FUNCTIONS) | set(POOL_FUNCTIONS)
    for name in dispatch.TRITON_KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"spconv::{name}", "CUDA"), name
        table = torch._C._dispatch_dump_table(f"spconv::{name}")
        cuda_line = next(line for line in table.splitlines() if line.startswith("CUDA:"))
        assert "python" in cuda_line.lower() or "dispatch.py" in cuda_line, cuda_line  # the Triton adapter


def _redispatch_cuda(name, *args):
    """Call the CUDA kernel of spconv::<name> on CPU tensors: what a CUDA tensor reaches, run in the interpreter."""
    op = getattr(torch.ops.spconv, name).default
    return op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)


def test_cuda_kernels_are_the_triton_kernels(monkeypatch):
    calls = _count_triton_calls(monkeypatch)
    shape = [7, 8, 6]
    feats, idx = random_sparse(shape, 2, 0.2, 3, seed=4)
    subm = _redispatch_cuda("build_subm_map", idx, 2, shape, [3] * 3, [1] * 3)
    assert torch.equal(subm, ops.build_subm_map(idx, shape, [3] * 3, [1] * 3))  # both sorted by the same rule
    out_idx, nbr = _redispatch_cuda("build_conv_map", idx, 2, shape, [4, 4, 3], [3] * 3, [2] * 3, [1] * 3, [1] * 3,
                                    False)
    ref_idx, ref_nbr = ops.build_conv_map(idx, shape, [4, 4, 3], [3] * 3, [2] * 3, [1] * 3, [1] * 3, False)
    assert torch.equal(out_idx, ref_idx) and _pairs(out_idx, idx, nbr) == _pairs(ref_idx, idx, ref_nbr)
    assert torch.equal(_redispatch_cuda("invert_map", nbr, idx.shape[0]), ops.invert_map(ref_nbr, idx.shape[0]))
    w, dy = torch.randn(5, 27, 3), torch.randn(idx.shape[0], 5)
    torch.testing.assert_close(_redispatch_cuda("gather_conv", feats, subm, w, 1, False),
                               ops.gather_conv(feats, subm, w, 1, False), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_redispatch_cuda("gather_conv_weight_grad", feats, subm, dy, 1),
                               ops.gather_conv_weight_grad(feats, subm, dy, 1), rtol=1e-5, atol=1e-5)
    pooled, arg = _redispatch_cuda("maxpool_forward", feats, nbr, True)
    ref_pooled, ref_arg = ops.maxpool_forward(feats, ref_nbr, True)
    assert torch.equal(pooled, ref_pooled) and torch.equal(arg, ref_arg)
    assert set(calls) == set(FUNCTIONS) | {"maxpool_forward"}, calls


def _count_triton_calls(monkeypatch):
    """Counts the calls of spconv.triton's functions (what the registered kernels call)."""
    calls = collections.Counter()
    for name in FUNCTIONS + POOL_FUNCTIONS:
        def counted(*args, _fn=getattr(T, name), _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(T, name, counted)
    return calls


def test_triton_on_cpu_swaps_the_cpu_kernels(monkeypatch):
    calls = _count_triton_calls(monkeypatch)
    cpu = torch.zeros(1)
    x, table, w = torch.randn(4, 3), torch.tensor([[0, 1], [2, -1]], dtype=torch.int32), torch.randn(2, 2, 3)
    ref = torch.ops.spconv.gather_conv(x, table, w, 1, False)
    assert not calls and not dispatch.use_triton(cpu)
    with dispatch.triton_on_cpu():
        assert dispatch.use_triton(cpu)
        with dispatch.triton_on_cpu():  # nested
            torch.testing.assert_close(torch.ops.spconv.gather_conv(x, table, w, 1, False), ref)
        assert dispatch.use_triton(cpu)
        torch.testing.assert_close(ops.gather_conv(x, table, w, 1, False), ref)
    assert calls["gather_conv"] == 2
    assert not dispatch.use_triton(cpu)
    torch.ops.spconv.gather_conv(x, table, w, 1, False)  # the C++ kernel again
    assert calls["gather_conv"] == 2
    assert dispatch.use_triton(types.SimpleNamespace(device=torch.device("cuda", 0)))  # NVIDIA and ROCm
    assert not dispatch.use_triton(torch.zeros(1, device="meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with dispatch.triton_on_cpu():
            pass
    torch.ops.spconv.gather_conv(x, table, w, 1, False)
    assert calls["gather_conv"] == 2  # a failed entry leaves the C++ kernels in place


def test_spconv_backend_environment(monkeypatch):
    monkeypatch.setenv("SPCONV_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="SPCONV_BACKEND"):
        dispatch.enable_from_environment()
    monkeypatch.setenv("SPCONV_BACKEND", "cpu")
    dispatch.enable_from_environment()
    assert not dispatch.use_triton(torch.zeros(1))
    monkeypatch.setenv("SPCONV_BACKEND", "triton")
    monkeypatch.setattr(dispatch, "_process_wide", None)
    dispatch.enable_from_environment()
    try:
        assert dispatch.use_triton(torch.zeros(1))
    finally:
        dispatch._process_wide.__exit__(None, None, None)
    assert not dispatch.use_triton(torch.zeros(1))


@pytest.fixture
def triton_backend(monkeypatch):
    """spconv.pytorch runs on the Triton kernels (CPU tensors, interpreter) inside the test; counts their calls."""
    calls = _count_triton_calls(monkeypatch)
    with dispatch.triton_on_cpu():
        yield calls


def _second_like(cin=4):
    """SECOND-style: SubM blocks, a strided conv, an inverse conv back to the input sites, a z-squeeze."""
    def block(conv, c):
        return [conv, nn.BatchNorm1d(c, eps=1e-3, momentum=0.01), nn.ReLU()]
    return spconv.SparseSequential(
        *block(spconv.SubMConv3d(cin, 8, 3, padding=1, bias=False, indice_key="subm1"), 8),
        *block(spconv.SubMConv3d(8, 8, 3, padding=1, bias=False, indice_key="subm1"), 8),
        *block(spconv.SparseConv3d(8, 16, 3, stride=2, padding=1, bias=False, indice_key="spconv2"), 16),
        *block(spconv.SubMConv3d(16, 16, 3, padding=1, bias=False, indice_key="subm2"), 16),
        *block(spconv.SparseInverseConv3d(16, 17, 3, bias=False, indice_key="spconv2"), 17),
        spconv.SparseConv3d(17, 8, (3, 1, 1), stride=(2, 1, 1), padding=0, bias=True, indice_key="spconv_down2"),
    )


def _run(net, feats, idx, shape, batch):
    x = spconv.SparseConvTensor(feats.clone().requires_grad_(True), idx, shape, batch)
    y = net(x)
    loss = (y.features * torch.linspace(-1, 1, y.features.numel()).view_as(y.features)).sum()
    net.zero_grad()
    loss.backward()
    return y, x.features.grad, {n: p.grad.clone() for n, p in net.named_parameters()}


def test_second_like_network_triton_equals_cpu(monkeypatch):
    """spconv.pytorch's layers (ops.py calls torch.ops.spconv.*) on the C++ kernels, then on the Triton ones."""
    calls = _count_triton_calls(monkeypatch)
    shape, batch = [9, 16, 14], 2
    feats, idx = random_sparse(shape, batch, 0.05, 4, seed=5)
    torch.manual_seed(0)
    net = _second_like()
    y_cpu, dx_cpu, dw_cpu = _run(net, feats, idx, shape, batch)
    assert sum(calls.values()) == 0
    with dispatch.triton_on_cpu():
        y_tri, dx_tri, dw_tri = _run(net, feats, idx, shape, batch)
    assert set(calls) == set(FUNCTIONS), calls  # every op ran on Triton
    assert y_tri.spatial_shape == y_cpu.spatial_shape == [4, 16, 14]
    assert torch.equal(y_tri.indices, y_cpu.indices)
    torch.testing.assert_close(y_tri.dense(), y_cpu.dense(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx_tri, dx_cpu, rtol=1e-4, atol=1e-4)
    for name in dw_cpu:
        torch.testing.assert_close(dw_tri[name], dw_cpu[name], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_autocast_runs_reduced_precision_on_triton(triton_backend):
    """AMP semantics: under autocast sparse convs run in the autocast dtype (fp16 on CUDA; here the CPU's
    autocast with fp16 stands in for it) and accumulate in fp32; parameter gradients stay fp32."""
    shape = [7, 8, 6]
    feats, idx = random_sparse(shape, 1, 0.2, 3, seed=2)
    torch.manual_seed(1)
    conv = spconv.SubMConv3d(3, 17, 3, indice_key="a")
    x = spconv.SparseConvTensor(feats, idx, shape, 1)
    with torch.autocast("cpu", dtype=torch.float16):
        y = conv(x)
    assert y.features.dtype == torch.float16
    y.features.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32
    assert triton_backend["gather_conv"] == 1 and triton_backend["gather_conv_weight_grad"] == 1
    ref = conv(x).features
    torch.testing.assert_close(y.features.float(), ref.detach(), rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------------
# pooling: the Triton kernels against the CPU kernels, and spconv's pool layers on them

def _pool_case(dtype, seed=0):
    """Features with ties, negative-only outputs and a NaN; a strided 3x3x3 map and its inverse."""
    shape = [7, 8, 6]
    _, idx = random_sparse(shape, 2, 0.2, 1, seed=seed)
    out_idx, table = ops.build_conv_map(idx, shape, [4, 4, 3], [3] * 3, [2] * 3, [1] * 3, [1] * 3, False)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(idx.shape[0], 19, generator=g)
    x[::3, :4] = -torch.rand(x[::3, :4].shape, generator=g) - 0.5  # some outputs negative everywhere
    x[1::4, 5] = 0.25  # ties between taps
    x[7, 2] = float("nan")
    return x.to(dtype), table, ops.invert_map(table, idx.shape[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zero_floor", [False, True])
def test_maxpool_equals_cpu(dtype, zero_floor):
    x, table, inv = _pool_case(dtype, seed=3)
    out, arg = T.maxpool_forward(x, table, zero_floor)
    ref, ref_arg = ops.maxpool_forward(x, table, zero_floor)
    assert out.dtype == dtype and arg.dtype == torch.int32
    assert torch.equal(arg, ref_arg)  # same tap order, same ties, same NaN rule, same floor
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    torch.testing.assert_close(T.maxpool_backward(dy, arg, inv), ops.maxpool_backward(dy, ref_arg, inv),
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_avgpool_equals_cpu(dtype):
    x, table, inv = _pool_case(dtype, seed=4)
    x = torch.nan_to_num(x)
    counts = T.active_counts(table)
    out = T.avgpool_forward(x, table)
    ref, ref_counts = ops.avgpool_forward(x, table)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    torch.testing.assert_close(T.avgpool_backward(dy, counts, inv), ops.avgpool_backward(dy, counts, inv),
                               **TOL[dtype])


def test_pools_on_empty_input():
    table = torch.zeros((0, 8), dtype=torch.int32)
    out, arg = T.maxpool_forward(torch.randn(5, 3), table, True)
    assert out.shape == arg.shape == (0, 3)
    assert T.avgpool_forward(torch.randn(5, 3), table).shape == (0, 3)
    inv = torch.full((5, 8), -1, dtype=torch.int32)
    assert T.maxpool_backward(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int32), inv).abs().sum() == 0
    out, arg = T.maxpool_forward(torch.zeros(0, 3), torch.full((2, 8), -1, dtype=torch.int32), False)
    assert out.abs().sum() == 0 and (arg == -1).all()


@pytest.mark.parametrize("layer", ["max", "avg"])
def test_pool_layers_triton_equals_cpu(monkeypatch, layer):
    """spconv.pytorch's SparseMaxPool3d (spconv 2.x's zero floor) and SparseAvgPool3d, forward and backward, on
    the C++ kernels and on the Triton kernels: the maps and the pools run on Triton."""
    calls = _count_triton_calls(monkeypatch)
    shape, batch = [9, 10, 8], 2
    feats, idx = random_sparse(shape, batch, 0.15, 5, seed=8)
    feats = feats - 0.3  # some outputs below the zero floor
    pool = (spconv.SparseMaxPool3d if layer == "max" else spconv.SparseAvgPool3d)(3, stride=2, padding=1)

    def run():
        x = spconv.SparseConvTensor(feats.clone().requires_grad_(True), idx, shape, batch)
        y = pool(x)
        (y.features * torch.linspace(-1, 1, y.features.numel()).view_as(y.features)).sum().backward()
        return y, x.features.grad

    y_cpu, dx_cpu = run()
    assert not calls
    with dispatch.triton_on_cpu():
        y_tri, dx_tri = run()
    names = ("maxpool_forward", "maxpool_backward") if layer == "max" else ("avgpool_forward", "avgpool_backward")
    assert all(calls[n] == 1 for n in names + ("build_conv_map", "invert_map")), calls
    assert torch.equal(y_tri.indices, y_cpu.indices)
    torch.testing.assert_close(y_tri.features, y_cpu.features, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx_tri, dx_cpu, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# the kernels also compile for a real GPU (the interpreter does not run Triton's compiler)

def test_kernels_compile_for_sm80():
    """scripts/triton_compile_check.py --quick: PTX + cubin for sm_80 (ptxas ships with triton), with mma."""
    import os
    import subprocess
    import sys
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPCONV_BACKEND")}
    proc = subprocess.run([sys.executable, os.path.join(root, "scripts", "triton_compile_check.py"), "--quick"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
