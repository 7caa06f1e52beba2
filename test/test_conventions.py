"""Project conventions: `python -m spconv`, torch.compile, serialisation (pickle, deepcopy, state_dict,
torch.save/torch.load), logging instead of prints, and shape docstrings on the public classes."""
import ast
import copy
import importlib
import inspect
import io
import logging
import os
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

import spconv.pytorch as spconv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _input(n=60, size=8, channels=4, seed=0, batch_size=2):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(batch_size * size ** 3, generator=g)[:n]
    b, rest = flat // size ** 3, flat % size ** 3
    indices = torch.stack([b, rest // size ** 2, rest // size % size, rest % size], 1).int()
    return torch.randn(n, channels, generator=g), indices, [size] * 3, batch_size


def _net(seed=0):
    torch.manual_seed(seed)
    return spconv.SparseSequential(
        spconv.SubMConv3d(4, 8, 3, indice_key="s1"), nn.BatchNorm1d(8), nn.ReLU(),
        spconv.SparseConv3d(8, 16, 3, 2, 1, indice_key="d1", record_voxel_count=True), nn.ReLU(),
        spconv.SubMConv3d(16, 16, 3, indice_key="s2"),
        spconv.SparseInverseConv3d(16, 8, 3, indice_key="d1"),
        spconv.SubMConv3d(8, 8, 3, indice_key="s1", bias=False),
        spconv.SparseMaxPool3d(2, 2, indice_key="p1"),
        spconv.SparseAvgPool3d(2, 2),
        spconv.ToDense(),
    )


def _run(net, feats, indices, shape, batch_size):
    return net(spconv.SparseConvTensor(feats, indices, shape, batch_size))


# --------------------------------------------------------------------------------------------------
# python -m spconv

def test_python_m_spconv_prints_the_installation():
    out = subprocess.run([sys.executable, "-m", "spconv"], capture_output=True, text=True, timeout=120, check=True)
    lines = dict(line.split(": ", 1) for line in out.stdout.strip().splitlines())
    assert lines["spconv"] == importlib.import_module("spconv").__version__
    assert lines["torch"] == torch.__version__
    assert lines["backend"].startswith("CPU extension loaded"), lines["backend"]
    assert lines["threads"].split()[0].isdigit()
    from spconv.__main__ import cpu_flags
    if cpu_flags():  # x86 Linux: the flags line is read
        assert "AVX-512" in lines["cpu"] and "AMX" in lines["cpu"]
    assert lines["triton"].startswith(("not installed", "importable", "installed but not importable"))
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        assert lines["conv kernels"].startswith("AVX-512 implicit GEMM"), lines["conv kernels"]
    elif flags:
        assert lines["conv kernels"] == "portable gather + GEMM"
    assert lines["cpu allocator"].startswith("spconv caching allocator")


def test_spconv_info_threads_and_cpu_flags(tmp_path):
    from spconv.__main__ import cpu_flags, info
    assert info()["threads"].startswith(f"{torch.get_num_threads()} ")
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(str(fake)) == {"fpu", "avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == set()


# --------------------------------------------------------------------------------------------------
# torch.compile

@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")  # the voxel-count buffer's fill_
def test_torch_compile_same_output_and_gradients():
    """A model with SubM, strided, inverse convs and pools compiles (graph breaks at kernel-map building
    and input validation are expected) and gives the eager outputs and gradients."""
    import torch._dynamo
    torch._dynamo.reset()
    feats, indices, shape, bs = _input()
    eager, compiled_net = _net(), _net()
    compiled = torch.compile(compiled_net, backend="aot_eager")
    f1, f2 = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    ref = _run(eager, f1, indices, shape, bs)
    out = _run(compiled, f2, indices, shape, bs)
    assert out.shape == ref.shape == (bs, 8, 2, 2, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    ref.square().sum().backward()
    out.square().sum().backward()
    torch.testing.assert_close(f2.grad, f1.grad, rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_net.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    again = _run(compiled, feats, indices, shape, bs)  # cached graphs, no recompilation crash
    torch.testing.assert_close(again, ref.detach(), rtol=1e-5, atol=1e-6)


def test_fake_kernels_keep_convs_in_the_graph():
    """With the fake kernels of spconv/pytorch/_meta.py, only kernel-map building (data-dependent sizes)
    and the input checks break the graph: gather_conv itself no longer does."""
    import torch._dynamo
    torch._dynamo.reset()
    feats, indices, shape, bs = _input()
    net = spconv.SparseSequential(spconv.SubMConv3d(4, 8, 3, indice_key="s1"), nn.ReLU(),
                                  spconv.SubMConv3d(8, 8, 3, indice_key="s1")).eval()

    def f(x_feats):
        return net(spconv.SparseConvTensor(x_feats, indices, shape, bs)).features

    explanation = torch._dynamo.explain(f)(feats)
    reasons = " ".join(str(b.reason) for b in explanation.break_reasons)
    assert "spconv.gather_conv" not in reasons
    assert "spconv.build_subm_map" not in reasons


def _op_cases():
    feats, indices, shape, bs = _input()
    subm = torch.ops.spconv.build_subm_map(indices, bs, shape, [3, 3, 3], [1, 1, 1])
    out_idx, table = torch.ops.spconv.build_conv_map(indices, bs, shape, [4, 4, 4], [3, 3, 3], [2, 2, 2], [1, 1, 1],
                                                     [1, 1, 1], False)
    table_in = torch.ops.spconv.invert_map(table, feats.shape[0])
    w = torch.randn(6, 27, 4)
    w_g = torch.randn(6, 27, 2)
    out_grad = torch.randn(table.shape[0], 6)
    pooled, argmax = torch.ops.spconv.maxpool_forward(feats, table)
    counts = torch.ops.spconv.active_counts(table)
    return {
        "gather_conv": [(feats, table, w, 1, False), (feats, table, w_g, 2, False),
                        (out_grad, table_in, w, 1, True), (out_grad, table_in, w_g, 2, True)],
        "gather_conv_weight_grad": [(feats, table, out_grad, 1), (feats, table, out_grad, 2),
                                    (feats.double(), subm, torch.randn(len(indices), 6).double(), 1)],
        "maxpool_forward": [(feats, table)],
        "maxpool_backward": [(torch.randn_like(pooled), argmax, table_in)],
        "avgpool_forward": [(feats, table), (feats.bfloat16(), subm)],
        "avgpool_backward": [(torch.randn_like(pooled), counts, table_in)],
        "active_counts": [(table,)],
        "build_subm_map": [(indices, bs, shape, [3, 3, 3], [1, 1, 1]), (indices, bs, shape, [3, 1, 5], [2, 1, 1])],
        "invert_map": [(table, feats.shape[0])],
    }


@pytest.mark.parametrize("op_name", list(_op_cases().keys()))
def test_fake_kernel_matches_the_real_op(op_name):
    """torch.library.opcheck: the fake kernel gives the real output's shapes, strides and dtypes."""
    op = getattr(torch.ops.spconv, op_name).default
    for args in _op_cases()[op_name]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(os.environ.get("SPCONV_TEST_INDUCTOR") != "1",
                    reason="inductor compiles C++ for ~30 s on 2 cores: set SPCONV_TEST_INDUCTOR=1 to run it")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torch_compile_inductor(tmp_path, monkeypatch):
    import torch._dynamo
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    feats, indices, shape, bs = _input()
    eager, compiled_net = _net(), _net()
    f1, f2 = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    ref = _run(eager, f1, indices, shape, bs)
    out = _run(torch.compile(compiled_net), f2, indices, shape, bs)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    ref.sum().backward()
    out.sum().backward()
    torch.testing.assert_close(f2.grad, f1.grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# serialisation

def _assert_same_module_output(a, b, feats, indices, shape, bs):
    a.eval()
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(_run(b, feats, indices, shape, bs), _run(a, feats, indices, shape, bs),
                                   rtol=0, atol=0)


def test_module_pickle_and_deepcopy():
    feats, indices, shape, bs = _input()
    net = _net()
    net.train()
    _run(net, feats, indices, shape, bs)  # updates BN statistics and the recorded voxel count
    for clone in (pickle.loads(pickle.dumps(net)), copy.deepcopy(net)):
        for (k, v), (k2, v2) in zip(net.state_dict().items(), clone.state_dict().items()):
            assert k == k2 and torch.equal(v, v2), k
        _assert_same_module_output(net, clone, feats, indices, shape, bs)
        with torch.no_grad():
            clone[0].weight.add_(1.0)
        assert not torch.equal(clone[0].weight, net[0].weight), "the copy shares storage with the original"


def test_state_dict_round_trip_through_torch_save(tmp_path):
    feats, indices, shape, bs = _input()
    net = _net(seed=1)
    net.train()
    _run(net, feats, indices, shape, bs)
    path = tmp_path / "state.pt"
    torch.save(net.state_dict(), path)
    fresh = _net(seed=2)
    fresh.load_state_dict(torch.load(path), strict=True)  # default weights_only=True
    assert int(fresh[3].max_num_voxels_during_training) == int(net[3].max_num_voxels_during_training) > 0
    _assert_same_module_output(net, fresh, feats, indices, shape, bs)


def test_whole_module_torch_save_load(tmp_path):
    feats, indices, shape, bs = _input()
    net = _net()
    path = tmp_path / "net.pt"
    torch.save(net, path)
    loaded = torch.load(path, weights_only=False)  # whole modules are pickled code: opt-in, as in torch
    _assert_same_module_output(net, loaded, feats, indices, shape, bs)


def test_sparse_conv_tensor_torch_save_load(tmp_path):
    """torch.save / torch.load (default weights_only=True) of a SparseConvTensor keeps features, indices,
    shape, batch size and the kernel maps: an inverse conv on the loaded tensor still works."""
    feats, indices, shape, bs = _input()
    torch.manual_seed(0)
    down = spconv.SparseConv3d(4, 8, 3, 2, 1, indice_key="d1")
    up = spconv.SparseInverseConv3d(8, 4, 3, indice_key="d1")
    with torch.no_grad():
        y = down(spconv.SparseConvTensor(feats, indices, shape, bs, force_algo=spconv.ConvAlgo.MaskImplicitGemm))
        y.indice_dict["d1"].input_major_pairs  # materialise the lazily built table too
    path = tmp_path / "sparse.pt"
    torch.save(y, path)
    z = torch.load(path)
    assert isinstance(z, spconv.SparseConvTensor)
    assert torch.equal(z.features, y.features) and torch.equal(z.indices, y.indices)
    assert z.spatial_shape == y.spatial_shape and z.batch_size == y.batch_size
    assert z.force_algo == spconv.ConvAlgo.MaskImplicitGemm
    assert list(z.indice_dict) == ["d1"] and torch.equal(z.indice_dict["d1"].indice_pairs, y.indice_dict["d1"].indice_pairs)
    with torch.no_grad():
        torch.testing.assert_close(up(z).dense(), up(y).dense(), rtol=0, atol=0)
        assert torch.equal(up(z).indices, indices)


def test_sparse_conv_tensor_pickle_and_deepcopy():
    feats, indices, shape, bs = _input()
    with torch.no_grad():
        y = spconv.SubMConv3d(4, 8, 3, indice_key="s1")(spconv.SparseConvTensor(feats, indices, shape, bs))
    for z in (pickle.loads(pickle.dumps(y)), copy.deepcopy(y)):
        assert torch.equal(z.features, y.features) and torch.equal(z.indices, y.indices)
        assert z.spatial_shape == y.spatial_shape and list(z.indice_dict) == ["s1"]
        assert torch.equal(z.dense(), y.dense())
    z = copy.deepcopy(y)
    assert z.features.data_ptr() != y.features.data_ptr()


# --------------------------------------------------------------------------------------------------
# logging, docstrings

def _library_files():
    for dirpath, _, files in os.walk(os.path.join(ROOT, "spconv")):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, ROOT)
            # command-line entry points print by design: python -m spconv, python -m spconv.benchmark,
            # python -m spconv.check
            if (name.endswith(".py") and name != "__main__.py" and "benchmark" not in rel
                    and rel != os.path.join("spconv", "check.py")):
                yield path


def test_library_code_does_not_print():
    offenders = []
    for path in _library_files():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not offenders, f"use logging.getLogger(__name__) instead of print: {offenders}"


def test_debug_modules_log_on_the_spconv_logger(caplog):
    from spconv.pytorch.modules import PrintTensorMeta
    feats, indices, shape, bs = _input()
    x = spconv.SparseConvTensor(feats, indices, shape, bs)
    with caplog.at_level(logging.INFO, logger="spconv"):
        assert PrintTensorMeta()(x) is x
    assert any(r.name == "spconv" and "SparseConvTensor" in r.getMessage() for r in caplog.records)


DOCUMENTED_MODULES = ["spconv.pytorch", "spconv.pytorch.core", "spconv.pytorch.conv", "spconv.pytorch.pool",
                      "spconv.pytorch.modules", "spconv.pytorch.tables", "spconv.pytorch.identity",
                      "spconv.pytorch.spatial", "spconv.pytorch.functional"]


def test_public_classes_have_docstrings_with_shapes():
    missing = []
    for modname in DOCUMENTED_MODULES:
        mod = importlib.import_module(modname)
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and obj.__module__ == modname and not name.startswith("_"):
                doc = obj.__dict__.get("__doc__") or ""
                if "[" not in doc:  # a shape such as ``[N, C]``
                    missing.append(f"{modname}.{name}")
    assert not missing, f"public classes without a docstring stating shapes: {missing}"


def test_readme_quick_start_runs():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Quick start"):]
    code = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    scope = {}
    exec(compile(code, "README.md quick start", "exec"), scope)
    x, y = scope["x"], scope["y"]
    assert torch.equal(y.indices, x.indices) and y.features.shape == (x.indices.shape[0], 16)
    assert y.dense().shape == (1, 16, 20, 80, 80)
    assert all(p.grad is not None for p in scope["net"].parameters())
