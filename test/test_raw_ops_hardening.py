"""The raw operators (torch.ops.spconv.*) are public: hostile arguments must raise a Python exception naming
the argument, never crash the process or return garbage, and never modify what was passed in.

Each op's hostile cases run in a fresh subprocess (a segfault there is a test failure naming the case, not a
crashed pytest). Valid calls are checked against independent references (plain torch / python loops)."""
import itertools
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import spconv.pytorch  # noqa: F401  (loads torch.ops.spconv)

ops = torch.ops.spconv

# Tensors every case may use (defined in the subprocess): 5 input sites in a [4, 4, 4] grid, batch size 2,
# a 27-tap table over them, features with 3 channels, a weight [2, 27, 3].
PRELUDE = """
import torch
import spconv.pytorch
from spconv.pytorch.hash import HashTable
ops = torch.ops.spconv
idx = torch.tensor([[0, 0, 0, 0], [0, 1, 2, 3], [1, 3, 3, 3], [1, 0, 1, 2], [0, 2, 2, 2]], dtype=torch.int32)
shape = [4, 4, 4]
f = torch.randn(5, 3)
t = ops.build_subm_map(idx, 2, shape, [3, 3, 3], [1, 1, 1])
w = torch.randn(2, 27, 3)
g = torch.randn(5, 2)
def bad(table, r, c, v):
    table = table.clone()
    table[r, c] = v
    return table
t_hi, t_neg, t_max = bad(t, 1, 4, 5), bad(t, 2, 0, -2), bad(t, 4, 26, 2 ** 31 - 1)
pooled, argmax = ops.maxpool_forward(f, t)
t_in = ops.invert_map(t, 5)
counts = ops.active_counts(t)
pts = torch.rand(100, 4) * 4
before = {k: v.clone() for k, v in dict(globals()).items() if isinstance(v, torch.Tensor)}
"""

RUNNER = """
import json, sys
cases = json.loads(sys.argv[1])
exec(PRELUDE_SRC)
for name, code in cases:
    print(json.dumps({"start": name}), flush=True)
    try:
        exec(code)
        res = {"name": name, "raised": None, "msg": ""}
    except Exception as e:
        res = {"name": name, "raised": type(e).__name__, "msg": str(e).split("\\nException raised from")[0]}
    changed = [k for k, v in before.items() if not torch.equal(globals()[k], v)]
    res["changed"] = changed
    print(json.dumps(res), flush=True)
"""

# op -> [(case name, code, exception type, regex the message must match)]
CASES = {
    "gather_conv": [
        ("entry == N_in", "ops.gather_conv(f, t_hi, w, 1, False)", "IndexError", r"table holds 5 at \[1, 4\].*\[-1, 5\)"),
        ("entry < -1", "ops.gather_conv(f, t_neg, w, 1, False)", "IndexError", r"table holds -2"),
        ("entry 2^31-1", "ops.gather_conv(f, t_max, w, 1, False)", "IndexError", r"2147483647"),
        ("int64 table", "ops.gather_conv(f, t.long(), w, 1, False)", "TypeError", r"table must be int32"),
        ("1-D table", "ops.gather_conv(f, t.flatten(), w, 1, False)", "ValueError", r"table must be 2-D"),
        ("taps != columns", "ops.gather_conv(f, t[:, :9], w, 1, False)", "ValueError", r"27 kernel taps.*9 columns"),
        ("dtype mismatch", "ops.gather_conv(f, t, w.double(), 1, False)", "TypeError", r"cast one"),
        ("int features", "ops.gather_conv(f.int(), t, w.int(), 1, False)", "TypeError", r"features must be float"),
        ("1-D features", "ops.gather_conv(f.flatten(), t, w, 1, False)", "ValueError", r"features must be 2-D"),
        ("channels", "ops.gather_conv(f[:, :2], t, w, 1, False)", "ValueError", r"features have 2 channels"),
        ("channels transposed", "ops.gather_conv(f, t, w, 1, True)", "ValueError", r"features have 3 channels"),
        ("groups 0", "ops.gather_conv(f, t, w, 0, False)", "ValueError", r"groups must be >= 1"),
        ("groups not dividing", "ops.gather_conv(f, t, w, 3, False)", "ValueError", r"groups"),
        ("2-D weight", "ops.gather_conv(f, t, w[:, 0], 1, False)", "ValueError", r"weight must be 3-D"),
    ],
    "gather_conv_weight_grad": [
        ("rows", "ops.gather_conv_weight_grad(f, t, g[:4], 1)", "ValueError", r"out_grad has 4 rows.*5"),
        ("entry == N_in", "ops.gather_conv_weight_grad(f, t_hi, g, 1)", "IndexError", r"table holds 5"),
        ("entry < -1", "ops.gather_conv_weight_grad(f, t_neg, g, 1)", "IndexError", r"table holds -2"),
        ("dtype", "ops.gather_conv_weight_grad(f, t, g.double(), 1)", "TypeError", r"out_grad is"),
        ("groups", "ops.gather_conv_weight_grad(f, t, g, 3)", "ValueError", r"groups"),
        ("int64 table", "ops.gather_conv_weight_grad(f, t.long(), g, 1)", "TypeError", r"int32"),
    ],
    "build_subm_map": [
        ("coordinate == shape", "ops.build_subm_map(idx + torch.tensor([0, 0, 0, 1], dtype=torch.int32), 2, shape,"
         " [3, 3, 3], [1, 1, 1])", "ValueError", r"spatial dimension 2.*\[1, 4\].*\[0, 4\)"),
        ("negative coordinate", "ops.build_subm_map(idx - torch.tensor([0, 1, 0, 0], dtype=torch.int32) * "
         "(idx[:, 1:2] == 0), 2, shape, [3, 3, 3], [1, 1, 1])", "ValueError", r"spatial dimension 0.*\[-1, 3\]"),
        ("batch >= batch_size", "ops.build_subm_map(idx, 1, shape, [3, 3, 3], [1, 1, 1])", "ValueError",
         r"batch_size=1"),
        ("batch_size 0", "ops.build_subm_map(idx, 0, shape, [3, 3, 3], [1, 1, 1])", "ValueError", r"batch_size"),
        ("shape 0", "ops.build_subm_map(idx, 2, [4, 0, 4], [3, 3, 3], [1, 1, 1])", "ValueError",
         r"spatial_shape\[1\] = 0"),
        ("shape negative", "ops.build_subm_map(idx, 2, [4, -4, 4], [3, 3, 3], [1, 1, 1])", "ValueError",
         r"spatial_shape\[1\] = -4"),
        ("ksize 0", "ops.build_subm_map(idx, 2, shape, [3, 0, 3], [1, 1, 1])", "ValueError", r"ksize\[1\] = 0"),
        ("dilation 0", "ops.build_subm_map(idx, 2, shape, [3, 3, 3], [1, 0, 1])", "ValueError", r"dilation\[1\] = 0"),
        ("ksize length", "ops.build_subm_map(idx, 2, shape, [3, 3], [1, 1, 1])", "ValueError",
         r"ksize has 2 entries.*3"),
        ("dilation length", "ops.build_subm_map(idx, 2, shape, [3, 3, 3], [1])", "ValueError", r"dilation has 1"),
        ("indices columns", "ops.build_subm_map(idx[:, :3], 2, shape, [3, 3, 3], [1, 1, 1])", "ValueError",
         r"indices must be \[N, 1 \+ ndim\]"),
        ("int64 indices", "ops.build_subm_map(idx.long(), 2, shape, [3, 3, 3], [1, 1, 1])", "TypeError", r"int32"),
        ("5-D", "ops.build_subm_map(torch.zeros(1, 6, dtype=torch.int32), 1, [2] * 5, [3] * 5, [1] * 5)",
         "ValueError", r"1 to 4 entries"),
        ("volume >= 2^62", "ops.build_subm_map(idx, 2, [2 ** 31 - 1] * 3, [3, 3, 3], [1, 1, 1])", "ValueError",
         r"2\^62"),
        ("kernel volume", "ops.build_subm_map(idx, 2, shape, [2 ** 11] * 3, [1, 1, 1])", "ValueError",
         r"kernel volume"),
        ("duplicates", "ops.build_subm_map(torch.cat([idx, idx[:1]]), 2, shape, [3, 3, 3], [1, 1, 1])",
         "ValueError", r"duplicate"),
    ],
    "build_conv_map": [
        ("coordinate == shape", "ops.build_conv_map(idx, 2, [4, 4, 3], [2, 2, 1], [3] * 3, [2] * 3, [1] * 3, "
         "[1] * 3, False)", "ValueError", r"spatial dimension 2"),
        ("batch", "ops.build_conv_map(idx, 1, shape, [2] * 3, [3] * 3, [2] * 3, [1] * 3, [1] * 3, False)",
         "ValueError", r"batch_size=1"),
        ("out_shape length", "ops.build_conv_map(idx, 2, shape, [2] * 2, [3] * 3, [2] * 3, [1] * 3, [1] * 3, False)",
         "ValueError", r"out_shape has 2 entries"),
        ("stride 0", "ops.build_conv_map(idx, 2, shape, [2] * 3, [3] * 3, [2, 0, 2], [1] * 3, [1] * 3, False)",
         "ValueError", r"stride\[1\] = 0"),
        ("padding -1", "ops.build_conv_map(idx, 2, shape, [2] * 3, [3] * 3, [2] * 3, [1, -1, 1], [1] * 3, False)",
         "ValueError", r"padding\[1\] = -1"),
        ("padding length", "ops.build_conv_map(idx, 2, shape, [2] * 3, [3] * 3, [2] * 3, [1], [1] * 3, False)",
         "ValueError", r"padding has 1"),
        ("out_shape 0", "ops.build_conv_map(idx, 2, shape, [2, 0, 2], [3] * 3, [2] * 3, [1] * 3, [1] * 3, False)",
         "ValueError", r"out_shape\[1\] = 0"),
        ("out coordinate > int32", "ops.build_conv_map(idx, 2, shape, [2 ** 32] * 3, [3] * 3, [1] * 3, "
         "[2 ** 31 - 3] * 3, [1] * 3, False)", "ValueError", r"does not fit the int32.*padding="),
        ("out volume >= 2^62", "ops.build_conv_map(idx, 2, shape, [2 ** 22] * 3, [3] * 3, [2 ** 20] * 3, "
         "[1] * 3, [1] * 3, True)", "ValueError", r"output grid.*2\^62.*transposed conv"),
        ("in_shape 0", "ops.build_conv_map(idx, 2, [0, 4, 4], [2] * 3, [3] * 3, [2] * 3, [1] * 3, [1] * 3, False)",
         "ValueError", r"in_shape\[0\] = 0"),
    ],
    "invert_map": [
        ("num_inputs too small", "ops.invert_map(t, 3)", "IndexError", r"num_inputs=3"),
        ("num_inputs negative", "ops.invert_map(t, -1)", "ValueError", r"num_inputs"),
        ("entry < -1", "ops.invert_map(t_neg, 5)", "IndexError", r"nbr holds -2"),
        ("int64", "ops.invert_map(t.long(), 5)", "TypeError", r"int32"),
        ("1-D", "ops.invert_map(t.flatten(), 5)", "ValueError", r"2-D"),
    ],
    "maxpool_forward": [
        ("entry == N_in", "ops.maxpool_forward(f, t_hi)", "IndexError", r"table holds 5"),
        ("entry 2^31-1", "ops.maxpool_forward(f, t_max, True)", "IndexError", r"2147483647"),
        ("int features", "ops.maxpool_forward(f.int(), t)", "TypeError", r"features must be float"),
        ("float table", "ops.maxpool_forward(f, t.float())", "TypeError", r"table must be int32"),
    ],
    "maxpool_backward": [
        ("argmax shape", "ops.maxpool_backward(torch.randn(5, 3), argmax[:, :2], t_in)", "ValueError",
         r"argmax has shape"),
        ("argmax int64", "ops.maxpool_backward(torch.randn(5, 3), argmax.long(), t_in)", "TypeError", r"int32"),
        ("argmax range", "ops.maxpool_backward(torch.randn(5, 3), argmax + 5, t_in)", "IndexError", r"argmax holds"),
        ("table_in range", "ops.maxpool_backward(torch.randn(3, 3), argmax[:3], t_in)", "IndexError",
         r"table_in holds.*\[-1, 3\)"),
        ("out_grad 1-D", "ops.maxpool_backward(torch.randn(15), argmax, t_in)", "ValueError", r"out_grad must be 2-D"),
    ],
    "active_counts": [
        ("float table", "ops.active_counts(t.float())", "TypeError", r"int32"),
        ("3-D table", "ops.active_counts(t[None])", "ValueError", r"2-D"),
    ],
    "avgpool_forward": [
        ("entry == N_in", "ops.avgpool_forward(f, t_hi)", "IndexError", r"table holds 5"),
        ("entry < -1", "ops.avgpool_forward(f, t_neg)", "IndexError", r"table holds -2"),
        ("1-D features", "ops.avgpool_forward(f[:, 0], t)", "ValueError", r"2-D"),
    ],
    "avgpool_backward": [
        ("counts length", "ops.avgpool_backward(torch.randn(5, 3), counts[:4], t_in)", "ValueError",
         r"counts must be 1-D"),
        ("counts negative", "ops.avgpool_backward(torch.randn(5, 3), counts - 100, t_in)", "IndexError",
         r"counts holds"),
        ("counts int64", "ops.avgpool_backward(torch.randn(5, 3), counts.long(), t_in)", "TypeError", r"int32"),
        ("counts zero", "ops.avgpool_backward(torch.randn(5, 3), counts * 0, t_in)", "ValueError", r"count is 0"),
        ("table_in range", "ops.avgpool_backward(torch.randn(2, 3), counts[:2], t_in)", "IndexError",
         r"table_in holds"),
    ],
    "point_to_voxel": [
        ("int points", "ops.point_to_voxel(pts.int(), [1.0] * 3, [4] * 3, [0.0] * 3 + [4.0] * 3, 10, 5, False)",
         "ValueError", r"float32 or float64"),
        ("grid_size length", "ops.point_to_voxel(pts, [1.0] * 3, [4] * 2, [0.0] * 3 + [4.0] * 3, 10, 5, False)",
         "ValueError", r"grid_size"),
        ("voxel size 0", "ops.point_to_voxel(pts, [1.0, 0.0, 1.0], [4] * 3, [0.0] * 3 + [4.0] * 3, 10, 5, False)",
         "ValueError", r"voxel sizes"),
        ("grid 0", "ops.point_to_voxel(pts, [1.0] * 3, [4, 0, 4], [0.0] * 3 + [4.0] * 3, 10, 5, False)",
         "ValueError", r"grid_size"),
        ("max voxels 0", "ops.point_to_voxel(pts, [1.0] * 3, [4] * 3, [0.0] * 3 + [4.0] * 3, 0, 5, False)",
         "ValueError", r"max_num_voxels"),
        ("1-D points", "ops.point_to_voxel(pts.flatten(), [1.0] * 3, [4] * 3, [0.0] * 3 + [4.0] * 3, 10, 5, False)",
         "ValueError", r"points must be \[N, F\]"),
        ("too few columns", "ops.point_to_voxel(pts[:, :2], [1.0] * 3, [4] * 3, [0.0] * 3 + [4.0] * 3, 10, 5, False)",
         "ValueError", r"F >= 3"),
        ("points per voxel", "ops.point_to_voxel(pts, [1.0] * 3, [4] * 3, [0.0] * 3 + [4.0] * 3, 10, 2 ** 40, "
         "False)", "ValueError", r"max_num_points_per_voxel"),
        ("huge grid", "ops.point_to_voxel(pts, [1.0] * 3, [2 ** 31 - 1] * 3, [0.0] * 3 + [4.0] * 3, 10, 5, False)",
         "ValueError", r"too many cells"),
    ],
    "HashTable": [
        ("2-D keys", "HashTable('cpu', torch.int64, torch.int64).insert(torch.zeros(2, 2, dtype=torch.int64))",
         "ValueError", r"keys must be 1-D"),
        ("key dtype", "HashTable('cpu', torch.int64, torch.int64).insert(torch.zeros(2, dtype=torch.int32))",
         "ValueError", r"keys must be torch.int64"),
        ("values length", "HashTable('cpu', torch.int64, torch.int64).insert(torch.zeros(2, dtype=torch.int64), "
         "torch.zeros(3, dtype=torch.int64))", "ValueError", r"one entry per key"),
        ("query values length", "h = HashTable('cpu', torch.int32, torch.float32); h.insert(torch.arange(4, "
         "dtype=torch.int32)); h.query(torch.arange(4, dtype=torch.int32), torch.zeros(2))", "ValueError",
         r"one entry per key"),
    ],
}


def _run_cases(cases):
    """Runs [(name, code)] in a fresh process; returns ({name: result}, returncode, stderr)."""
    script = "PRELUDE_SRC = " + repr(PRELUDE) + "\n" + RUNNER
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    results, started = {}, None
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        if "start" in rec:
            started = rec["start"]
        else:
            results[rec["name"]] = rec
    if proc.returncode != 0:
        pytest.fail(f"the process died (exit code {proc.returncode}) during case {started!r}:\n{proc.stderr[-3000:]}")
    return results


@pytest.mark.parametrize("op", sorted(CASES))
def test_hostile_arguments_raise_clear_errors(op):
    cases = CASES[op]
    results = _run_cases([(name, code) for name, code, _, _ in cases])
    import re
    problems = []
    for name, code, exc, pattern in cases:
        r = results[name]
        if r["raised"] != exc:
            problems.append(f"{name}: expected {exc}, got {r['raised']}: {r['msg'][:300]}")
        elif not re.search(pattern, r["msg"], re.S):
            problems.append(f"{name}: message does not match {pattern!r}: {r['msg'][:400]}")
        elif r["raised"] and op not in ("point_to_voxel", "HashTable") and "spconv" not in r["msg"]:
            problems.append(f"{name}: message does not say where it comes from: {r['msg'][:300]}")
        if r["changed"]:
            problems.append(f"{name}: modified the inputs {r['changed']}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------------
# valid calls: the same results as independent references

def _sites(shape, batch_size, n, seed):
    g = np.random.default_rng(seed)
    vol = int(np.prod(shape))
    rows = []
    for b in range(batch_size):
        flat = g.choice(vol, size=n, replace=False)
        rows.append(np.concatenate([np.full((n, 1), b), np.stack(np.unravel_index(flat, shape), 1)], 1))
    return torch.from_numpy(np.concatenate(rows)).int()


def _ref_subm_table(indices, ksize, dilation):
    where = {tuple(r): i for i, r in enumerate(indices.tolist())}
    offsets = list(itertools.product(*[range(k) for k in ksize]))
    table = torch.full((len(indices), len(offsets)), -1, dtype=torch.int32)
    for j, row in enumerate(indices.tolist()):
        for r, off in enumerate(offsets):
            x = tuple(row[1 + d] - (ksize[d] // 2) * dilation[d] + off[d] * dilation[d] for d in range(len(ksize)))
            table[j, r] = where.get((row[0],) + x, -1)
    return table


def _ref_conv_map(indices, in_shape, out_shape, ksize, stride, padding, dilation, transposed):
    where = {tuple(r): i for i, r in enumerate(indices.tolist())}
    offsets = list(itertools.product(*[range(k) for k in ksize]))
    nd = len(ksize)
    outs = {}
    for i, row in enumerate(indices.tolist()):
        for r, off in enumerate(offsets):
            y = []
            for d in range(nd):
                x = row[1 + d]
                if transposed:
                    v = x * stride[d] - padding[d] + off[d] * dilation[d]
                else:
                    t = x + padding[d] - off[d] * dilation[d]
                    if t % stride[d]:
                        break
                    v = t // stride[d]
                if not 0 <= v < out_shape[d]:
                    break
                y.append(v)
            else:
                outs.setdefault((row[0],) + tuple(y), {})[r] = i
    keys = sorted(outs)
    table = torch.full((len(keys), len(offsets)), -1, dtype=torch.int32)
    for j, k in enumerate(keys):
        for r, i in outs[k].items():
            table[j, r] = i
    return torch.tensor(keys, dtype=torch.int32).reshape(-1, nd + 1), table


def test_valid_maps_match_reference():
    idx = _sites([5, 6, 7], 2, 40, 0)
    assert torch.equal(ops.build_subm_map(idx, 2, [5, 6, 7], [3, 3, 3], [1, 1, 1]),
                       _ref_subm_table(idx, [3, 3, 3], [1, 1, 1]))
    assert torch.equal(ops.build_subm_map(idx, 2, [5, 6, 7], [3, 1, 5], [2, 1, 1]),
                       _ref_subm_table(idx, [3, 1, 5], [2, 1, 1]))
    for transposed, out_shape, stride, padding in [(False, [3, 3, 4], [2, 2, 2], [1, 1, 1]),
                                                   (True, [11, 13, 15], [2, 2, 2], [0, 0, 0])]:
        oi, tb = ops.build_conv_map(idx, 2, [5, 6, 7], out_shape, [3] * 3, stride, padding, [1] * 3, transposed)
        ri, rt = _ref_conv_map(idx, [5, 6, 7], out_shape, [3] * 3, stride, padding, [1] * 3, transposed)
        assert torch.equal(oi, ri) and torch.equal(tb, rt)
    # non-contiguous indices are accepted (and read correctly)
    nc = torch.cat([idx, idx], 1)[:, :4]
    assert not nc.is_contiguous()
    assert torch.equal(ops.build_subm_map(nc, 2, [5, 6, 7], [3, 3, 3], [1, 1, 1]),
                       _ref_subm_table(idx, [3, 3, 3], [1, 1, 1]))
    inv = ops.invert_map(tb, idx.shape[0])
    ref_inv = torch.full((idx.shape[0], 27), -1, dtype=torch.int32)
    for j, r in (tb >= 0).nonzero().tolist():
        ref_inv[tb[j, r], r] = j
    assert torch.equal(inv, ref_inv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_valid_kernels_match_reference(dtype):
    idx = _sites([5, 6, 7], 2, 40, 1)
    table = ops.build_subm_map(idx, 2, [5, 6, 7], [3, 3, 3], [1, 1, 1])
    g = torch.Generator().manual_seed(0)
    f = torch.randn(idx.shape[0], 6, generator=g).to(dtype)
    w = torch.randn(4, 27, 6, generator=g).to(dtype)
    # reference: gather rows per tap (-1 -> zero row), contract in float64
    padded = torch.cat([f.double(), torch.zeros(1, 6, dtype=torch.float64)])
    gathered = padded[table.long()]  # [N, K, C_in]; index -1 is the zero row
    ref = torch.einsum("nkc,okc->no", gathered, w.double())
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.gather_conv(f, table, w, 1, False).double(), ref, **tol)
    # non-contiguous table: same result
    tnc = torch.cat([table, table], 1)[:, :27]
    torch.testing.assert_close(ops.gather_conv(f, tnc, w, 1, False).double(), ref, **tol)
    dout = torch.randn(idx.shape[0], 4, generator=g).to(dtype)
    ref_dw = torch.einsum("no,nkc->okc", dout.double(), gathered)
    torch.testing.assert_close(ops.gather_conv_weight_grad(f, table, dout, 1).double(), ref_dw,
                               **(dict(rtol=3e-2, atol=2e-1) if dtype == torch.bfloat16 else tol))
    # pools
    big = torch.finfo(torch.float64).max
    masked = torch.where((table >= 0)[..., None], gathered, torch.full_like(gathered, -big))
    mx = masked.max(1).values
    out, _ = ops.maxpool_forward(f, table)
    torch.testing.assert_close(out.double(), mx, rtol=0, atol=0)
    cnt = (table >= 0).sum(1)
    torch.testing.assert_close(ops.active_counts(table), cnt.int())
    torch.testing.assert_close(ops.avgpool_forward(f, table).double(), gathered.sum(1) / cnt[:, None], **tol)


# --------------------------------------------------------------------------------------------------
# output grids that do not fit (issue 12, section 2): clear errors, never a crash or wrong sites

_GRID_CASES = [
    ("SparseConv2d(4, 4, 3, padding=2**31-3)", "spconv.SparseConv2d(4, 4, 3, padding=2**31-3)", [8, 8]),
    ("SparseConvTranspose3d(4, 4, 3, stride=2**22)", "spconv.SparseConvTranspose3d(4, 4, 3, stride=2**22)",
     [8, 8, 8]),
    ("SparseConvTranspose3d(4, 8, 3, 2) on [2**21, 2**21, 2**19]", "spconv.SparseConvTranspose3d(4, 8, 3, 2)",
     [2 ** 21, 2 ** 21, 2 ** 19]),
    ("SparseConvTranspose1d(4, 4, 3, 2) on [2**31-1]", "spconv.SparseConvTranspose1d(4, 4, 3, 2)", [2 ** 31 - 1]),
]


@pytest.mark.parametrize("name,layer,shape", _GRID_CASES, ids=[c[0] for c in _GRID_CASES])
def test_output_grid_too_large_is_a_clear_error(name, layer, shape):
    code = textwrap.dedent(f"""
        import torch, spconv.pytorch as spconv
        shape = {shape!r}
        nd = len(shape)
        idx = torch.tensor([[0] + [s - 1 for s in shape], [0] + [0] * nd], dtype=torch.int32)
        x = spconv.SparseConvTensor(torch.randn(2, 4), idx, shape, 1)
        try:
            {layer}(x)
        except ValueError as e:
            print("VALUEERROR", str(e).split("Exception raised from")[0])
        else:
            print("NO ERROR")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"process died with {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("VALUEERROR"), proc.stdout + proc.stderr[-2000:]
    msg = proc.stdout
    assert "int64" in msg or "int32" in msg, msg
    assert "kernel_size=" in msg and "stride=" in msg and "padding=" in msg, msg


# --------------------------------------------------------------------------------------------------
# large padding / dilation: memory follows the number of sites, results match a brute-force reference

def _brute_sparse_conv(feats, coords, shape, weight, stride, padding, dilation, subm):
    """Sparse conv (one batch) by brute force over sites: {output coordinate: vector}. weight [O, *k, I]."""
    ksize = weight.shape[1:-1]
    nd = len(shape)
    out = {}
    if subm:
        targets = [tuple(c) for c in coords]
    for (c, fv) in zip(coords, feats):
        for off in itertools.product(*[range(k) for k in ksize]):
            y = []
            for d in range(nd):
                if subm:
                    t = c[d] + (ksize[d] // 2) * dilation[d] - off[d] * dilation[d]
                    v = t
                else:
                    t = c[d] + padding[d] - off[d] * dilation[d]
                    if t % stride[d]:
                        break
                    v = t // stride[d]
                    out_d = (shape[d] + 2 * padding[d] - dilation[d] * (ksize[d] - 1) - 1) // stride[d] + 1
                    if not 0 <= v < out_d:
                        break
                y.append(v)
            else:
                y = tuple(y)
                if subm and y not in targets:
                    continue
                out[y] = out.get(y, 0) + weight[(slice(None),) + off + (slice(None),)] @ fv
    return out


_BIG = [("subm", 2 ** 26, 1), ("subm", 2 ** 30, 1), ("subm_pad", 1, 2 ** 26),
        ("conv", 2 ** 26, 2 ** 26), ("conv", 2 ** 30, 2 ** 30), ("conv_pad", 1, 2 ** 26), ("conv_pad", 1, 2 ** 29)]


@pytest.mark.parametrize("kind,dilation,padding", _BIG, ids=[f"{k}-d{d}-p{p}" for k, d, p in _BIG])
def test_large_padding_and_dilation_use_little_memory(kind, dilation, padding):
    """A 2-site conv with dilation/padding 2^26..2^30 completes with a small peak RSS (measured in a fresh
    process) and the brute-force result."""
    coords = [[1, 2], [5, 7]] if kind != "subm_pad" else [[1, 2], [1, 2 + 3]]
    shape = [8, 8] if kind != "subm_pad" else [8, 2 ** 26]
    subm = kind.startswith("subm")
    if kind == "subm_pad":  # SubM pads itself: (k // 2) * dilation; a big grid instead of a big dilation
        dilation = 3
    if kind == "subm" or kind == "subm_pad":
        layer = f"spconv.SubMConv2d(3, 2, 3, dilation={dilation}, bias=False)"
        padding = 0
    else:
        layer = f"spconv.SparseConv2d(3, 2, 3, stride=1, padding={padding}, dilation={dilation}, bias=False)"
    code = textwrap.dedent(f"""
        import json, resource, torch, spconv.pytorch as spconv
        torch.manual_seed(0)
        coords = {coords!r}
        idx = torch.tensor([[0] + c for c in coords], dtype=torch.int32)
        feats = torch.randn(len(coords), 3, dtype=torch.float64)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        layer = {layer}.double()
        out = layer(spconv.SparseConvTensor(feats, idx, {shape!r}, 1))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(dict(extra_kb=peak - base, feats=feats.tolist(), weight=layer.weight.detach().tolist(),
                              out_idx=out.indices.tolist(), out=out.features.tolist(),
                              shape=list(out.spatial_shape))))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["extra_kb"] < 64 * 1024, f"peak RSS grew by {res['extra_kb'] / 1024:.0f} MB for a 2-site conv"
    weight = np.array(res["weight"])
    ref = _brute_sparse_conv(np.array(res["feats"]), coords, shape, weight, [1, 1], [padding] * 2, [dilation] * 2,
                             subm)
    got = {tuple(i[1:]): np.array(v) for i, v in zip(res["out_idx"], res["out"])}
    assert sorted(got) == sorted(ref)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-12, atol=1e-12)
