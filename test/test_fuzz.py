"""Fuzz test: random layer configurations and raw ops must give a correct result or a Python exception.

What it checks, case by case (hypothesis draws the cases with a fixed seed; no shrinking):

- Layer cases: a SparseConvTensor in 1-4D (spatial shapes from a few cells up to 2^62 cells and beyond,
  batch sizes including 0, negative, 1.5 and numpy ints, 0 sites, duplicate / negative / out-of-range
  sites, features in float16/bfloat16/float32/float64/int32/int64/bool/complex64, indices in int32 /
  int64 / int16 / float / uint8 / non-contiguous / transposed views), optionally mutated after
  construction (``x.indices``, ``x.spatial_shape``, ``x.batch_size`` reassigned, ``replace_feature`` with
  another row count), then one layer or a pair of layers (SubMConv, SparseConv, SparseConvTranspose,
  SparseInverseConv after a strided conv with the same indice_key, SubM map reuse through a key,
  SparseMaxPool, SparseAvgPool) with random kernel sizes, strides, paddings and dilations (up to 2^30),
  and ``dense()``.
- Raw-op cases: every ``torch.ops.spconv.*`` op registered by src/*.cpp (and the HashTable class) called
  with random tensors, including tables with out-of-range entries.

Each case runs in ONE worker subprocess that runs many cases (``python test/test_fuzz.py --worker``);
the worker prints ``START <case>`` and flushes before running a case, so when it dies by a signal
(or hangs past the timeout) the test fails naming the case that killed it. The expected outcome of a
case is computed by an oracle from the tensor's final state:

- valid input: the call must succeed and match a reference (compared by site coordinates against a
  brute-force sparse reference, and through ``.dense()`` against torch's dense conv /
  conv_transpose for small grids; weights are ``[out, *kernel, in/groups]``);
- invalid input (sites out of range, batch_size not a positive int, volume >= 2^62, a table entry out
  of range, ...): a Python exception is required (never silent garbage);
- doubtful input (unusual dtypes, unusual but harmless shapes, duplicate sites, whose values follow
  spconv 2.3.8 and are checked in test_client_patterns.py): anything but a signal or a hang.

Environment: ``FUZZ_EXAMPLES`` (examples per test, default keeps the file under ~30 s here),
``FUZZ_CASE_TIMEOUT`` (seconds before a case counts as a hang), ``FUZZ_MAX_DEATHS`` (worker deaths
before a test stops early), ``FUZZ_REPORT`` (a file to append every case's outcome to, for triage). Reproduce one case with
``python test/test_fuzz.py --run '<case json>'`` (printed in the failure message).
"""
import json
import os
import queue
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

HERE = os.path.dirname(os.path.abspath(__file__))
N_EXAMPLES = os.environ.get("FUZZ_EXAMPLES")  # default: 400 layer cases, 150 raw-op cases (~20 s here)
CASE_TIMEOUT = float(os.environ.get("FUZZ_CASE_TIMEOUT", "20"))
MAX_WORKER_DEATHS = int(os.environ.get("FUZZ_MAX_DEATHS", "1"))  # per test: stop early, each restart costs seconds
REPORT_FILE = os.environ.get("FUZZ_REPORT")  # append every case's outcome here (JSON lines)
WORKER_MEMORY_LIMIT = 8 << 30  # address-space cap of the worker: a huge allocation raises instead of swamping the box
INT32_MAX = 2 ** 31 - 1
KEY_LIMIT = 2 ** 62

# ======================================================================================================
# Worker side: builds and runs one case from its JSON description, reports the outcome.
# ======================================================================================================

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2, "complex64": 1e-4}


class Wrong(AssertionError):
    """The op returned, but the result is wrong (or it should have raised)."""


def _rng(case):
    return np.random.default_rng(case["seed"])


def _random_sites(case, rng, shape, n, batch):
    """n unique rows [b, c0, ...] (int64 numpy) inside batch [0, batch) and shape (capped to int32)."""
    rows, seen = [], set()
    for _ in range(20 * n + 20):
        if len(rows) == n:
            break
        row = [int(rng.integers(0, max(batch, 1)))]
        for s in shape:
            top = min(s, INT32_MAX + 1)
            if top <= 64 or rng.random() < 0.5:
                row.append(int(rng.integers(0, min(top, 64))))
            else:
                row.append(int(top - 1 - rng.integers(0, 3)) if top > 3 else int(rng.integers(0, top)))
        if tuple(row) not in seen:
            seen.add(tuple(row))
            rows.append(row)
    return np.array(rows, dtype=np.int64).reshape(len(rows), 1 + len(shape))


def _corrupt(case, rng, coords, shape, batch):
    """Injects the case's defect into the site array: duplicate, negative or out-of-range entries."""
    kind = case["corrupt"]
    if kind is None or len(coords) == 0:
        return coords
    coords = coords.copy()
    i = int(rng.integers(0, len(coords)))
    d = int(rng.integers(0, len(shape)))
    if kind == "duplicate":
        coords = np.concatenate([coords, coords[i:i + 1]])
    elif kind == "negative":
        coords[i, 1 + d] = -1 - int(rng.integers(0, 2))
    elif kind == "too_large":
        coords[i, 1 + d] = min(shape[d], INT32_MAX)
    elif kind == "batch_too_large":
        coords[i, 0] = max(batch, 1)
    elif kind == "batch_negative":
        coords[i, 0] = -1
    return coords


def _indices_tensor(torch, coords, variant):
    base = torch.from_numpy(coords.astype(np.int64))
    if variant == "int32":
        return base.int()
    if variant == "int64":
        return base
    if variant == "int16":
        return base.to(torch.int16)
    if variant == "uint8":
        return base.to(torch.uint8)
    if variant == "float":
        return base.float()
    if variant == "noncontig":  # every other column of a wider tensor
        wide = torch.zeros(base.shape[0], 2 * base.shape[1], dtype=torch.int32)
        wide[:, ::2] = base.int()
        return wide[:, ::2]
    if variant == "transposed":  # a transposed view of a [1 + D, N] tensor
        return base.int().t().contiguous().t()
    raise ValueError(variant)


def _features_tensor(torch, rng, n, c, dtype_name):
    vals = torch.from_numpy(rng.uniform(-1, 1, size=(n, c)))
    if dtype_name == "bool":
        return vals > 0
    if dtype_name in ("int32", "int64"):
        return (vals * 4).round().to(getattr(torch, dtype_name))
    if dtype_name == "complex64":
        return torch.complex(vals, vals.flip(1) if c > 0 else vals).to(torch.complex64)
    return vals.to(getattr(torch, dtype_name))


def _batch_arg(case):
    kind, value = case["batch"]
    if kind == "np.int64":
        return np.int64(value)
    if kind == "np.int32":
        return np.int32(value)
    if kind == "float":
        return float(value)
    return int(value)


def _shape_arg(case, shape):
    kind = case["shape_type"]
    if kind == "numpy":
        return np.array(shape, dtype=np.int64)
    if kind == "tuple":
        return tuple(shape)
    return list(shape)


def _state_problem(features, indices, spatial_shape, batch_size):
    """Why (features, indices, spatial_shape, batch_size) is not a valid sparse tensor, or None."""
    import torch
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        return f"batch_size {batch_size!r} is not an int"
    if batch_size <= 0:
        return "batch_size <= 0"
    try:
        shape = [int(s) for s in spatial_shape]
    except Exception:
        return "spatial_shape is not a sequence of ints"
    if any(isinstance(s, (float, np.floating)) and s != int(s) for s in spatial_shape):
        return "non-integral spatial_shape"
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[1] != len(shape) + 1:
        return "indices shape does not match spatial_shape"
    if not 1 <= len(shape) <= 4:
        return "ndim outside 1..4"
    if any(s <= 0 for s in shape):
        return "non-positive spatial_shape"
    if any(s > INT32_MAX for s in shape):
        return "spatial_shape entry above 2^31-1 (extents, like coordinates, are int32)"
    if int(batch_size) * _prod(shape) >= KEY_LIMIT:
        return "volume >= 2^62"
    if features.dim() != 2 or features.shape[0] != indices.shape[0]:
        return "features/indices row count mismatch"
    if indices.dtype != torch.int32:
        return "dtype"  # the values may still be fine: callers treat this one as doubtful
    if indices.shape[0]:
        ind = indices.long()
        if int(ind[:, 0].min()) < 0 or int(ind[:, 0].max()) >= batch_size:
            return "batch index out of range"
        for d, s in enumerate(shape):
            if int(ind[:, 1 + d].min()) < 0 or int(ind[:, 1 + d].max()) >= s:
                return "coordinate out of range"
        if torch.unique(ind, dim=0).shape[0] != ind.shape[0]:
            return "duplicate sites"
    return None


def _prod(vals):
    p = 1
    for v in vals:
        p *= int(v)
    return p


def _taps(ksize):
    return list(np.ndindex(*ksize))


def _layer_geometry(layer, ndim):
    expand = lambda v: [int(v)] * ndim if isinstance(v, int) else [int(t) for t in v]  # noqa: E731
    return expand(layer["k"]), expand(layer.get("s", 1)), expand(layer.get("p", 0)), expand(layer.get("d", 1))


def _out_shape(layer, shape):
    k, s, p, d = _layer_geometry(layer, len(shape))
    if layer["type"] in ("subm",):
        return list(shape)
    if layer["type"] == "tconv":
        return [(i - 1) * st_ + dl * (kk - 1) + 1 - 2 * pp for i, kk, st_, pp, dl in zip(shape, k, s, p, d)]
    return [(i + 2 * pp - dl * (kk - 1) - 1) // st_ + 1 for i, kk, st_, pp, dl in zip(shape, k, s, p, d)]


def _reference_map(layer, sites, shape, out_shape, batch):
    """Brute force: {output site: [(tap, input row), ...]} for subm / conv / tconv / pools (any size)."""
    k, s, p, d = _layer_geometry(layer, len(shape))
    kind = layer["type"]
    pos = {site: row for row, site in enumerate(sites)}
    out = {}
    for row, site in enumerate(sites):
        b, x = site[0], site[1:]
        for r, off in enumerate(_taps(k)):
            if kind == "subm":  # output y = x - (o - k//2) d reads x through tap o
                y = tuple(xi - (oi - ki // 2) * di for xi, oi, ki, di in zip(x, off, k, d))
                if (b,) + y not in pos:
                    continue
            elif kind == "tconv":
                y = tuple(xi * si - pi + oi * di for xi, si, pi, oi, di in zip(x, s, p, off, d))
            else:
                t = [xi + pi - oi * di for xi, pi, oi, di in zip(x, p, off, d)]
                if any(ti % si for ti, si in zip(t, s)):
                    continue
                y = tuple(ti // si for ti, si in zip(t, s))
            if all(0 <= yi < oi for yi, oi in zip(y, out_shape)):
                out.setdefault((b,) + y, []).append((r, row))
    return out


def _apply_weights(torch, contrib, feats, weight, groups):
    """out[site] = sum over (tap, row) of W_tap @ f[row], in float64 / complex128; also sum |W||f|."""
    cdt = torch.complex128 if feats.is_complex() else torch.float64
    f = feats.to(cdt)
    w = weight.detach().to(cdt)
    c_out, c_in_g = w.shape[0], w.shape[-1]
    w = w.reshape(c_out, -1, c_in_g)
    res, mag = {}, {}
    og = c_out // groups
    for site, pairs in contrib.items():
        acc = torch.zeros(c_out, dtype=cdt)
        macc = torch.zeros(c_out, dtype=torch.float64)
        for r, row in pairs:
            for g in range(groups):
                wg = w[g * og:(g + 1) * og, r, :]
                fg = f[row, g * c_in_g:(g + 1) * c_in_g]
                acc[g * og:(g + 1) * og] += wg @ fg
                macc[g * og:(g + 1) * og] += wg.abs() @ fg.abs()
        res[site], mag[site] = acc, macc
    return res, mag


def _compare_sites(torch, out, expected, mag, dtype_name, what):
    """out: SparseConvTensor; expected: {site: values}; compared by coordinates, not by row."""
    got_sites = [tuple(r) for r in out.indices.long().tolist()]
    if len(set(got_sites)) != len(got_sites):
        raise Wrong(f"{what}: output has duplicate sites")
    if set(got_sites) != set(expected):
        missing = sorted(set(expected) - set(got_sites))[:3]
        extra = sorted(set(got_sites) - set(expected))[:3]
        raise Wrong(f"{what}: output sites differ ({len(got_sites)} vs {len(expected)} expected; "
                    f"missing {missing}, unexpected {extra})")
    feats = out.features.detach()
    cdt = torch.complex128 if feats.is_complex() else torch.float64
    tol = TOLERANCE.get(dtype_name, 1e-4)
    for row, site in enumerate(got_sites):
        got, want = feats[row].to(cdt), expected[site].to(cdt)
        bound = tol * (1 + mag[site]) if mag is not None else tol * (1 + want.abs())
        if not bool(((got - want).abs() <= bound).all()):
            raise Wrong(f"{what}: value at site {site} is {got.tolist()}, expected {want.tolist()}")


def _padded_volume(layer, shape):
    """Cells of the padded grid torch's dense conv would allocate (huge with a large padding/dilation)."""
    k, _, p, d = _layer_geometry(layer, len(shape))
    pads = [(kk // 2) * dl for kk, dl in zip(k, d)] if layer["type"] == "subm" else p
    extents = [s + 2 * pp + dl * (kk - 1) for s, pp, dl, kk in zip(shape, pads, d, k)]
    return _prod(extents)


def _dense_reference_check(torch, layer, x_feats, x_sites, shape, batch, weight, out):
    """Small grids: out.dense() against torch's dense conv / conv_transpose on the input densified."""
    sys.path.insert(0, HERE)
    import helpers
    kind = layer["type"]
    ndim = len(shape)
    k, s, p, d = _layer_geometry(layer, ndim)
    dt = torch.float64
    xd = torch.zeros(batch, x_feats.shape[1], *shape, dtype=dt)
    occ = torch.zeros(batch, 1, *shape, dtype=dt)
    for row, site in enumerate(x_sites):
        xd[(site[0], slice(None)) + tuple(site[1:])] = x_feats[row].to(dt)
        occ[(site[0], 0) + tuple(site[1:])] = 1
    w = weight.detach().to(dt)
    ones = torch.ones(1, 1, *k, dtype=dt)
    if kind in ("conv", "subm"):
        pad = [(kk // 2) * dl for kk, dl in zip(k, d)] if kind == "subm" else p
        stride = [1] * ndim if kind == "subm" else s
        ref = helpers.dense_conv(xd, helpers.torch_conv_weight(w), stride, pad, d, layer.get("groups", 1))
        mask = occ if kind == "subm" else (helpers.dense_conv(occ, ones, stride, pad, d) > 0.5).to(dt)
    else:  # tconv
        ref = helpers.dense_conv_transpose(xd, helpers.torch_conv_t_weight(w, layer.get("groups", 1)), s, p, d,
                                           layer.get("groups", 1))
        mask = (helpers.dense_conv_transpose(occ, ones, s, p, d) > 0.5).to(dt)
    bias = layer.get("_bias")
    if bias is not None:
        ref = ref + torch.tensor(bias, dtype=dt).view(1, -1, *[1] * ndim)
    ref = ref * mask
    got = out.dense().detach().to(dt)
    if tuple(got.shape) != tuple(ref.shape):
        raise Wrong(f"{kind}: dense() shape {tuple(got.shape)}, dense torch reference {tuple(ref.shape)}")
    tol = TOLERANCE.get(layer["_dtype"], 1e-4) * (1 + float(xd.abs().max() if xd.numel() else 0) *
                                                  float(w.abs().sum(dim=tuple(range(1, w.dim()))).max()))
    err = float((got - ref).abs().max()) if got.numel() else 0.0
    if err > tol:
        raise Wrong(f"{kind}: dense() differs from the dense torch reference by {err:.3g} (tolerance {tol:.3g})")


def _make_layer(spconv, torch, layer, ndim, cin, cout):
    kind = layer["type"]
    k, s, p, d = layer["k"], layer.get("s", 1), layer.get("p", 0), layer.get("d", 1)
    key = layer.get("key")
    g = layer.get("groups", 1)
    if kind == "subm":
        return spconv.SparseConvolution(ndim, cin, cout, k, 1, 0, d, groups=g, subm=True, indice_key=key)
    if kind == "conv":
        return spconv.SparseConvolution(ndim, cin, cout, k, s, p, d, groups=g, indice_key=key)
    if kind == "tconv":
        return spconv.SparseConvolution(ndim, cin, cout, k, s, p, d, groups=g, transposed=True, indice_key=key)
    if kind == "inverse":
        return spconv.SparseConvolution(ndim, cin, cout, k, inverse=True, indice_key=key)
    from spconv.pytorch import pool as pools
    pool = pools.SparseMaxPool if kind == "maxpool" else pools.SparseAvgPool
    return pool(ndim, k, s, p, d, indice_key=key)


class Verdict:
    """What the oracle expects of the next call: ``problem`` (why the input is invalid: an exception is
    required), ``doubtful`` (unusual input: anything but a signal), ``raise_ok`` (valid, but raising is fine)."""

    def __init__(self):
        self.problem, self.doubtful, self.raise_ok = None, False, False

    def judge_state(self, features, indices, spatial_shape, batch_size):
        self.problem = _state_problem(features, indices, spatial_shape, batch_size)
        if self.problem == "dtype":  # indices of another dtype than int32: may be rejected or work
            self.problem, self.doubtful = None, True
        elif self.problem == "duplicate sites":  # accepted as spconv 2.3.8 does (values: test_client_patterns.py)
            self.problem, self.doubtful = None, True

    def on_exception(self, e, where):
        if self.problem is None and not self.doubtful and not self.raise_ok:
            raise Wrong(f"{where} raised on a valid input: {type(e).__name__}: {e}") from e
        return f"raised {type(e).__name__}: {e}"


def run_layer_case(case):
    import torch
    import spconv.pytorch as spconv
    rng = _rng(case)
    shape = [int(v) for v in case["shape"]]
    batch_arg = _batch_arg(case)
    true_batch = int(batch_arg) if int(batch_arg) == batch_arg else int(batch_arg) + 1
    coords = _corrupt(case, rng, _random_sites(case, rng, shape, case["n"], true_batch), shape, true_batch)
    features = _features_tensor(torch, rng, len(coords), case["cin"], case["fdtype"])
    indices = _indices_tensor(torch, coords, case["idx"])
    v = Verdict()
    v.judge_state(features, indices, shape, batch_arg)
    if case["idx"] not in ("int32", "noncontig", "transposed") or case["fdtype"] not in FLOAT_DTYPES:
        v.doubtful = True
    try:
        x = spconv.SparseConvTensor(features, indices, _shape_arg(case, shape), batch_arg)
    except Exception as e:
        return v.on_exception(e, "SparseConvTensor()")
    if case.get("mutation") is not None:
        try:
            x = _mutate(torch, rng, x, case["mutation"], shape, true_batch)
        except Exception as e:  # replace_feature with another row count raises here
            if case["mutation"] != "replace_feature_rows":
                raise
            return f"raised {type(e).__name__}: {e}"
        v.judge_state(x.features, x.indices, x.spatial_shape, x.batch_size)
    return _run_layers(torch, spconv, case, x, v)


def _config_problem(layer, ndim, cin, cout):
    k, s, p, d = _layer_geometry(layer, ndim) if layer["type"] != "inverse" else ([1], [1], [0], [1])
    if layer["type"] == "subm" and any(v % 2 == 0 for v in k):
        return "even SubM kernel"
    if cin % layer.get("groups", 1) or cout % layer.get("groups", 1):
        return "channels not divisible by groups"
    return None


def _mutate(torch, rng, x, mut, shape, batch):
    kind = mut
    n = x.indices.shape[0]
    if kind == "indices_other_valid":
        x.indices = torch.from_numpy(_random_sites({"seed": 0}, rng, shape, n, batch)).int() \
            if n else x.indices
    elif kind == "indices_out_of_range" and n:
        ind = x.indices.clone()
        ind[0, 1] = int(x.spatial_shape[0])
        x.indices = ind
    elif kind == "indices_negative" and n:
        ind = x.indices.clone()
        ind[-1, -1] = -5
        x.indices = ind
    elif kind == "indices_fewer_rows":
        x.indices = x.indices[: max(n - 1, 0)]
    elif kind == "indices_more_rows":
        x.indices = torch.cat([x.indices, x.indices[:1] if n else x.indices.new_zeros(1, x.indices.shape[1])])
    elif kind == "indices_int64":
        x.indices = x.indices.long()
    elif kind == "indices_permuted" and n:
        x.indices = x.indices[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
    elif kind == "shape_smaller":
        x.spatial_shape = [max(1, int(s) // 2) for s in x.spatial_shape]
    elif kind == "shape_larger":
        x.spatial_shape = [int(s) * 2 for s in x.spatial_shape]
    elif kind == "shape_wrong_ndim":
        x.spatial_shape = list(x.spatial_shape) + [3]
    elif kind == "shape_huge":
        x.spatial_shape = [2 ** 31 - 1] * len(x.spatial_shape) if len(x.spatial_shape) > 1 else [2 ** 62]
    elif kind == "shape_zero":
        x.spatial_shape = [0] + list(x.spatial_shape[1:])
    elif kind == "batch_smaller":
        x.batch_size = max(int(x.indices[:, 0].max()) if n else 0, 0)
    elif kind == "batch_larger":
        x.batch_size = x.batch_size + 2
    elif kind == "batch_float":
        x.batch_size = 1.5
    elif kind == "batch_negative":
        x.batch_size = -1
    elif kind == "replace_feature_rows":
        x = x.replace_feature(x.features[: max(n - 1, 0)] if n else x.features.new_zeros(1, x.features.shape[1]))
    return x


def _run_layers(torch, spconv, case, x, v):
    layers, ndim, in_dtype = case["layers"], case["ndim"], case["fdtype"]
    cur, cin = x, case["cin"]
    notes = []
    for li, layer in enumerate(layers):
        what = f"layer {li} ({layer['type']})"
        if li == 1 and case.get("mutate_between"):  # sites changed after a kernel map was stored under a key
            cur = _mutate(torch, np.random.default_rng(case["seed"] + 1), cur, case["mutate_between"],
                          list(cur.spatial_shape), cur.batch_size)
            v.judge_state(cur.features, cur.indices, cur.spatial_shape, cur.batch_size)
            v.raise_ok = True  # refusing a stale indice_key is fine; a result must still be right
        if layer["type"] == "dense":
            try:
                _run_dense(torch, cur, v)
            except Wrong:
                raise
            except Exception as e:
                return v.on_exception(e, "dense()")
            continue
        cout = case["cout"] if layer["type"] not in ("maxpool", "avgpool") else cin
        config_problem = _config_problem(layer, ndim, cin, cout)
        try:
            mod = _make_layer(spconv, torch, layer, ndim, cin, cout)
        except Exception as e:
            if config_problem is None:
                raise Wrong(f"{what}: constructor raised on a valid configuration: {type(e).__name__}: {e}") from e
            return f"raised {type(e).__name__}: {e}"
        v.problem = v.problem or config_problem
        if in_dtype in FLOAT_DTYPES or in_dtype == "complex64":
            mod = mod.to(getattr(torch, in_dtype))
        layer = dict(layer, _dtype=in_dtype, _bias=mod.bias.detach().double().tolist()
                     if getattr(mod, "bias", None) is not None and not mod.bias.is_complex() else None)
        expected = None
        if v.problem is None:
            expected, v.problem = _expected_output(torch, case, layer, cur, mod, li, layers, v)
        try:
            with torch.no_grad():
                out = mod(cur)
        except Exception as e:
            return v.on_exception(e, what)
        if v.problem is not None:
            raise Wrong(f"{what} returned on an invalid input ({v.problem}); expected a Python exception")
        if expected is not None and not v.doubtful:
            exp_sites, mag = expected
            _compare_sites(torch, out, exp_sites, mag, in_dtype, what)
            if (layer["type"] in ("conv", "subm", "tconv") and _prod(cur.spatial_shape) * cur.batch_size <= 4096
                    and _prod(out.spatial_shape) <= 4096 and in_dtype != "complex64"
                    and _padded_volume(layer, cur.spatial_shape) <= 1 << 20):
                _dense_reference_check(torch, layer, cur.features, [tuple(r) for r in cur.indices.long().tolist()],
                                       list(cur.spatial_shape), cur.batch_size, mod.weight, out)
        elif not v.doubtful:  # at least: row counts, finiteness, indices in range
            _sanity(torch, out, what)
        notes.append(f"{layer['type']}: {out.indices.shape[0]} sites {list(out.spatial_shape)}")
        cur, cin = out, cout
    return "ok " + "; ".join(notes)


def _sanity(torch, out, what):
    if out.features.shape[0] != out.indices.shape[0]:
        raise Wrong(f"{what}: {out.features.shape[0]} feature rows for {out.indices.shape[0]} sites")
    if out.features.is_floating_point() and not bool(torch.isfinite(out.features.float()).all()):
        raise Wrong(f"{what}: non-finite output features")
    problem = _state_problem(out.features, out.indices, out.spatial_shape, out.batch_size)
    if problem is not None:
        raise Wrong(f"{what}: the output is not a valid sparse tensor: {problem}")


def _expected_output(torch, case, layer, x, mod, li, layers, v):
    """(expected {site: features}, magnitudes) or None when too big to brute-force; plus an output problem."""
    kind = layer["type"]
    shape = [int(s) for s in x.spatial_shape]
    batch = int(x.batch_size)
    sites = [tuple(r) for r in x.indices.long().tolist()]
    ndim = len(shape)
    if kind == "inverse":
        prev = layers[li - 1]
        if li == 0 or prev.get("key") != layer.get("key") or prev["type"] not in ("conv", "maxpool", "avgpool"):
            return None, "inverse conv without the matching strided layer"
        if case.get("mutate_between"):
            return None, None
        src = case["_pre_inverse"]
        fwd = _reference_map(prev, src["sites"], src["shape"], shape, batch)
        row_of = {site: row for row, site in enumerate(sites)}
        contrib = {}
        for row_in, site_in in enumerate(src["sites"]):
            contrib[site_in] = []
        for y, pairs in fwd.items():
            for r, row_in in pairs:
                contrib[src["sites"][row_in]].append((r, row_of[y]))
        res, mag = _apply_weights(torch, contrib, x.features, mod.weight, 1)
        return (_with_bias(torch, res, mod), mag), None
    k, s, p, d = _layer_geometry(layer, ndim)
    if any(t < 1 for t in k + s + d) or any(t < 0 for t in p):
        return None, "bad geometry"
    out_shape = _out_shape(layer, shape)
    if any(v <= 0 for v in out_shape):
        return None, "output size <= 0"
    if batch * _prod(out_shape) >= KEY_LIMIT:
        return None, "output volume >= 2^62"
    if any(v > INT32_MAX for v in out_shape):
        return None, "output extent above 2^31-1 (spatial shapes, like coordinates, are int32)"
    if any(t > INT32_MAX for t in k + s + p + d):
        v.raise_ok = True  # geometry beyond int32 may be refused even when the output would fit
    if kind in ("maxpool", "avgpool") and x.features.dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                                                    torch.float64):
        v.doubtful = True  # pools on integer features: may work or raise
        return None, None
    if len(sites) * len(_taps(k)) > 20000:
        return None, None
    contrib = _reference_map(layer, sites, shape, out_shape, batch)
    if any(max(site) > INT32_MAX for site in contrib):
        return None, "output coordinates do not fit int32"
    if li + 1 < len(layers) and layers[li + 1]["type"] == "inverse":
        case["_pre_inverse"] = {"sites": sites, "shape": shape}
    if kind in ("maxpool", "avgpool"):
        f = x.features.to(torch.float64)
        res = {}
        for site, pairs in contrib.items():
            rows = f[[row for _, row in pairs]]
            # spconv 2.3.8's max pool starts from 0: max(0, max over the active inputs)
            res[site] = rows.max(0).values.clamp_min(0) if kind == "maxpool" else rows.mean(0)
        return (res, None), None
    res, mag = _apply_weights(torch, contrib, x.features, mod.weight, layer.get("groups", 1))
    return (_with_bias(torch, res, mod), mag), None


def _with_bias(torch, res, mod):
    if getattr(mod, "bias", None) is None:
        return res
    b = mod.bias.detach().to(torch.complex128 if mod.bias.is_complex() else torch.float64)
    return {site: v + b for site, v in res.items()}


def _run_dense(torch, x, v):
    problem, doubtful = v.problem, v.doubtful
    too_big = problem is None and x.batch_size * _prod(x.spatial_shape) * max(x.features.shape[1], 1) > 10 ** 6
    if too_big:
        return
    out = x.dense()
    if problem is not None:
        raise Wrong(f"dense() returned on an invalid input ({problem}); expected a Python exception")
    shape = [int(s) for s in x.spatial_shape]
    want = torch.zeros(x.batch_size, x.features.shape[1], *shape, dtype=x.features.dtype)
    for row, site in enumerate(x.indices.long().tolist()):
        want[(site[0], slice(None)) + tuple(site[1:])] = x.features[row]
    if tuple(out.shape) != tuple(want.shape) or not torch.equal(out, want):
        raise Wrong(f"dense() differs from the scatter of the features (shape {tuple(out.shape)}, "
                    f"expected {tuple(want.shape)})")
    if not doubtful:
        cl = x.dense(channels_first=False)
        if not torch.equal(cl, want.movedim(1, -1)):
            raise Wrong("dense(channels_first=False) is not the channels-last dense()")


# ---------------------------------------------------------------------------------------------- raw ops

RAW_OPS = ("gather_conv", "gather_conv_weight_grad", "build_subm_map", "build_conv_map", "invert_map",
           "maxpool_forward", "maxpool_backward", "active_counts", "avgpool_forward", "avgpool_backward",
           "point_to_voxel", "HashTable")


_TABLE_EMPTY = [False]  # set when the last bad table had no entry to corrupt


def _random_table(torch, rng, m, k, n_src, bad):
    """int32 [m, k] table of rows in [-1, n_src) or, when bad, with one entry outside."""
    _TABLE_EMPTY[0] = bool(bad and m * k == 0)
    t = rng.integers(-1, max(n_src, 0), size=(m, k)) if n_src > 0 else np.full((m, k), -1)
    t = torch.from_numpy(t.astype(np.int64)).int()
    if bad and m * k:
        vals = [n_src, n_src + 7, -2, INT32_MAX, -(2 ** 31), 10 ** 6]
        t.view(-1)[int(rng.integers(0, m * k))] = int(vals[int(rng.integers(0, len(vals)))])
    return t


def run_raw_case(case):
    import torch
    import spconv.pytorch  # noqa: F401  (loads the extension)
    rng = _rng(case)
    ops = torch.ops.spconv
    op, bad = case["op"], case["bad"]
    n, m, k, c = case["n"], case["m"], case["k"], case["c"]
    f = torch.from_numpy(rng.uniform(-1, 1, size=(n, c))).float()
    if op == "gather_conv":
        table = _random_table(torch, rng, m, k, n, bad)
        w = torch.from_numpy(rng.uniform(-1, 1, size=(c, k, c))).float()
        out = ops.gather_conv(f, table, w, 1, bool(case["flag"]))
        _require_raise(bad, op)
        want = torch.zeros(m, c, dtype=torch.float64)
        for j in range(m):
            for r in range(k):
                i = int(table[j, r])
                if i >= 0:
                    wr = w[:, r, :].double()
                    want[j] += (wr.t() if case["flag"] else wr) @ f[i].double()
        if not torch.allclose(out.double(), want, atol=1e-4, rtol=1e-4):
            raise Wrong(f"gather_conv differs from the brute-force sum by {float((out.double() - want).abs().max())}")
        return "ok"
    if op == "gather_conv_weight_grad":
        table = _random_table(torch, rng, m, k, n, bad)
        dout = torch.from_numpy(rng.uniform(-1, 1, size=(m, c))).float()
        ops.gather_conv_weight_grad(f, table, dout, 1)
        return _require_raise(bad, op)
    if op in ("build_subm_map", "build_conv_map"):
        ndim = case["ndim"]
        shape = [int(v) for v in case["shape"]]
        coords = _random_sites(case, rng, shape, n, 2)
        coords = _corrupt(dict(case, corrupt=case["corrupt"]), rng, coords, shape, 2)
        indices = torch.from_numpy(coords).int()
        ksize, stride, pad, dil = (list(case[a]) for a in ("ksize", "stride", "padding", "dilation"))
        if op == "build_subm_map":
            ops.build_subm_map(indices, 2, shape, ksize, dil)
        else:
            ops.build_conv_map(indices, 2, shape, list(case["out_shape"]), ksize, stride, pad, dil, bool(case["flag"]))
        return _require_raise(case["corrupt"] is not None or len(ksize) != ndim or len(dil) != ndim
                              or min(ksize + dil, default=1) < 1 or (op == "build_conv_map" and (
                                  len(stride) != ndim or len(pad) != ndim or min(stride, default=1) < 1
                                  or len(case["out_shape"]) != ndim)), op)
    if op == "invert_map":
        table = _random_table(torch, rng, m, k, n, bad)
        ops.invert_map(table, n)
        return _require_raise(bad, op)
    if op == "maxpool_forward":
        ops.maxpool_forward(f, _random_table(torch, rng, m, k, n, bad))
        return _require_raise(bad, op)
    if op == "avgpool_forward":
        ops.avgpool_forward(f, _random_table(torch, rng, m, k, n, bad))
        return _require_raise(bad, op)
    if op == "active_counts":
        ops.active_counts(_random_table(torch, rng, m, k, n, bad))
        return "ok"
    if op == "maxpool_backward":  # out_grad [m, c], argmax [m, c] rows of inputs, table_in [n, k] rows of outputs
        dout = torch.from_numpy(rng.uniform(-1, 1, size=(m, c))).float()
        argmax = _random_table(torch, rng, m, c, n, False)
        if case["flag"]:  # argmax of another shape than out_grad
            argmax = argmax[: max(m - 1, 0)].contiguous()
        ops.maxpool_backward(dout, argmax, _random_table(torch, rng, n, k, m, bad))
        return _require_raise(bad or (case["flag"] and m > 0 and n > 0 and k > 0), op)
    if op == "avgpool_backward":
        dout = torch.from_numpy(rng.uniform(-1, 1, size=(m, c))).float()
        counts = torch.from_numpy(rng.integers(0 if case["flag"] else 1, 4, size=(m,))).int()
        if case["flag"]:
            counts = counts[: max(m - 1, 0)].contiguous()
        ops.avgpool_backward(dout, counts, _random_table(torch, rng, n, k, m, bad))
        return _require_raise(bad, op)
    if op == "point_to_voxel":
        ndim = case["ndim"]
        pts = torch.from_numpy(rng.uniform(-2, 12, size=(n, ndim + 1))).float()
        if case["flag"] and n:
            pts[0, 0] = float("nan")
        vsize = [float(v) for v in case["vsize"]]
        grid = [int(v) for v in case["shape"]]
        lo = [0.0] * ndim
        hi = [g * v for g, v in zip(grid, vsize)] if len(vsize) == len(grid) else [10.0] * ndim
        ops.point_to_voxel(pts, vsize, grid, lo + hi, case["m"], case["k"], bool(case["flag"]))
        return "ok"
    if op == "HashTable":
        kd, vd = (getattr(torch, name) for name in case["dtypes"])
        table = torch.classes.spconv.HashTable(kd, vd, case["m"])
        keys = torch.from_numpy(rng.integers(-5, 2 ** 40, size=n)).to(kd)
        vals = torch.from_numpy(rng.integers(0, 100, size=n if not case["flag"] else n + 1)).to(vd)
        table.insert(keys, vals)
        table.query(keys[: max(n // 2, 0)], None)
        table.items()
        return "ok"
    raise ValueError(op)


def _require_raise(bad, op):
    if bad and _TABLE_EMPTY[0]:
        _TABLE_EMPTY[0] = False
        return "ok (the table had no entry to make out of range)"
    if bad:
        raise Wrong(f"torch.ops.spconv.{op} returned on an invalid argument (an entry out of range); expected an "
                    "exception")
    return "ok"


def run_case(case):
    """Runs one case: 'ok ...' / 'raised ...' string, or raises Wrong (or any other exception on a bug)."""
    if case.get("__crash__"):  # the harness's own test: die by a signal, as a defect would
        import signal
        os.kill(os.getpid(), signal.SIGSEGV)
    return run_layer_case(case) if case["kind"] == "layer" else run_raw_case(case)


def _limit_memory():
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_LIMIT, WORKER_MEMORY_LIMIT))
    except (ImportError, ValueError, OSError):
        pass


def worker_main():
    """Reads one JSON case per line from stdin; prints START before and RESULT after each case."""
    _limit_memory()
    import torch
    torch.set_num_threads(1)
    import spconv.pytorch  # noqa: F401
    out = sys.stdout
    out.write("READY\n")
    out.flush()
    for line in sys.stdin:
        case = json.loads(line)
        out.write("START " + json.dumps(case) + "\n")
        out.flush()
        try:
            status, detail = "ok", run_case(case)
        except Wrong as e:
            status, detail = "fail", str(e)
        except Exception as e:
            status, detail = "raised", f"{type(e).__name__}: {e}"
        out.write("RESULT " + json.dumps({"status": status, "detail": detail[:2000]}) + "\n")
        out.flush()


# ======================================================================================================
# Parent side: the worker process and the hypothesis strategies.
# ======================================================================================================


class Worker:
    """One long-lived worker subprocess; ``run(case)`` -> (status, detail)."""

    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     env=env, cwd=os.path.dirname(HERE))
        self.lines = queue.Queue()
        self.stderr = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._drain, daemon=True).start()
        ready = self._read(120)
        if ready != "READY":
            raise RuntimeError(f"fuzz worker did not start: {ready!r}; stderr: {''.join(self.stderr)[-2000:]}")

    @staticmethod
    def _pump(stream, q):
        for line in stream:
            q.put(line.rstrip("\n"))
        q.put(None)

    def _drain(self):
        for line in self.proc.stderr:
            self.stderr.append(line)
            del self.stderr[:-50]

    def _read(self, timeout):
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return "TIMEOUT"

    def run(self, case):
        """(status, detail): ok / raised / fail (checked by the worker), or died / hang (worker gone)."""
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        last_started = None
        deadline = time.monotonic() + CASE_TIMEOUT
        while True:
            line = self._read(max(deadline - time.monotonic(), 0.01))
            if line == "TIMEOUT":
                self.close()
                return "hang", f"no result after {CASE_TIMEOUT:.0f} s (last case started: {last_started})"
            if line is None:
                code = self.proc.wait()
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                tail = "".join(self.stderr)[-1500:]
                return "died", f"worker died by {how} while running {last_started}\nworker stderr:\n{tail}"
            if line.startswith("START "):
                last_started = line[6:]
            elif line.startswith("RESULT "):
                res = json.loads(line[7:])
                return res["status"], res["detail"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Session:
    """Runs cases on a worker, restarting it after a death; collects failures for one test."""

    def __init__(self):
        self.worker = None
        self.failures = []
        self.deaths = 0
        self.counts = {}
        self.previous = None

    def run(self, case):
        if self.deaths >= MAX_WORKER_DEATHS:
            return
        if self.worker is None:
            self.worker = Worker()
        status, detail = self.worker.run(case)
        if status in ("died", "hang"):
            # a case can die of memory an earlier case corrupted: run it again in a fresh worker to tell
            self.deaths += 1
            self.worker = Worker()
            again, _ = self.worker.run(case)
            if again in ("died", "hang"):
                self.worker = None
                detail += "\n(reproduces when run alone in a fresh worker)"
            else:
                detail += (f"\n(does NOT reproduce alone, it gives {again!r}: an earlier case probably corrupted "
                           f"memory; the case before it was {json.dumps(self.previous)})")
        self.previous = case
        self.counts[status] = self.counts.get(status, 0) + 1
        if status in ("fail", "died", "hang"):
            self.failures.append((status, case, detail))
        if REPORT_FILE:  # deep runs: every outcome, one JSON line each, for triage
            with open(REPORT_FILE, "a") as f:
                f.write(json.dumps({"status": status, "detail": detail, "case": case}) + "\n")

    def close(self):
        if self.worker is not None:
            self.worker.close()

    def report(self):
        lines = [f"{len(self.failures)} failing case(s) (outcomes: {self.counts}):"]
        for status, case, detail in self.failures[:8]:
            lines.append(f"\n[{status}] {detail}\n  reproduce: python test/test_fuzz.py --run '{json.dumps(case)}'")
        if self.deaths >= MAX_WORKER_DEATHS:
            lines.append(f"\n(stopped after {self.deaths} worker deaths/hangs)")
        return "\n".join(lines)


@pytest.fixture
def session():
    s = Session()
    yield s
    s.close()


def _settings(default_examples):
    return settings(derandomize=True, database=None, deadline=None,
                    max_examples=int(N_EXAMPLES) if N_EXAMPLES else default_examples,
                    phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))


HUGE = [2 ** 20, 2 ** 30, 2 ** 31 - 1, 2 ** 31, 2 ** 40, 2 ** 61, 2 ** 62, 2 ** 63 - 1]
small_or_huge = st.one_of(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6), st.sampled_from(HUGE))


@st.composite
def layer_cases(draw):
    ndim = draw(st.integers(1, 4))
    shape = draw(st.lists(st.one_of(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7), st.integers(1, 7),
                                    st.sampled_from(HUGE)), min_size=ndim, max_size=ndim))
    batch = draw(st.one_of(
        st.tuples(st.just("int"), st.integers(1, 3)), st.tuples(st.just("int"), st.integers(1, 3)),
        st.tuples(st.sampled_from(["np.int64", "np.int32"]), st.integers(1, 3)),
        st.tuples(st.just("int"), st.integers(-2, 0)), st.tuples(st.just("float"), st.sampled_from([1.5, 2.5]))))
    kind = draw(st.sampled_from(["subm", "conv", "tconv", "inverse", "subm_reuse", "maxpool", "avgpool", "dense"]))

    def geometry(odd=False, stride=True):
        k = draw(st.one_of(st.sampled_from([1, 3] if odd else [1, 2, 3]),
                           st.lists(st.sampled_from([1, 3, 5] if odd else [1, 2, 3, 4]), min_size=ndim, max_size=ndim)))
        s = draw(st.one_of(st.integers(1, 3), st.sampled_from([2 ** 30, 2 ** 31 - 1]),
                           st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim))) if stride else 1
        p = draw(st.one_of(st.integers(0, 2), st.integers(0, 2), st.sampled_from([2 ** 20, 2 ** 30, 2 ** 31]),
                           st.lists(st.integers(0, 2), min_size=ndim, max_size=ndim)))
        d = draw(st.one_of(st.integers(1, 2), st.integers(1, 3), st.sampled_from([2 ** 20, 2 ** 30]),
                           st.lists(st.integers(1, 2), min_size=ndim, max_size=ndim)))
        return {"k": k, "s": s, "p": p, "d": d}

    groups = draw(st.sampled_from([1, 1, 1, 2]))
    if kind == "subm":
        layers = [dict(type="subm", groups=groups, **geometry(odd=draw(st.sampled_from([True, True, True, False])), stride=False))]
    elif kind == "subm_reuse":
        g = geometry(odd=True, stride=False)
        layers = [dict(type="subm", key="s", **g), dict(type="subm", key="s", **g)]
    elif kind in ("conv", "tconv"):
        layers = [dict(type=kind, groups=groups, **geometry())]
    elif kind == "inverse":
        down = draw(st.sampled_from(["conv", "conv", "maxpool", "avgpool"]))
        g = geometry()
        layers = [dict(type=down, key="down", **g), dict(type="inverse", key="down", k=g["k"])]
    elif kind in ("maxpool", "avgpool"):
        layers = [dict(type=kind, **geometry())]
    else:
        layers = []
    if kind != "dense" and draw(st.booleans()):
        layers.append({"type": "dense"})
    if kind == "dense":
        layers.append({"type": "dense"})
    # half the cases are "clean" (valid input, so the references are exercised), half "wild"
    wild = draw(st.booleans())
    pick = (lambda clean, odd: draw(st.one_of(clean, odd))) if wild else (lambda clean, odd: draw(clean))  # noqa: E731
    if not wild:
        shape = [min(v, 6) for v in shape]
        batch = draw(st.tuples(st.sampled_from(["int", "int", "np.int64", "np.int32"]), st.integers(1, 3)))
    return {
        "kind": "layer", "seed": draw(st.integers(0, 2 ** 31)), "ndim": ndim, "shape": shape,
        "shape_type": draw(st.sampled_from(["list", "list", "tuple", "numpy"])), "batch": list(batch),
        "n": draw(st.one_of(st.just(0), st.integers(1, 6), st.integers(1, 20))),
        "corrupt": pick(st.none(), st.sampled_from(
            ["duplicate", "negative", "too_large", "batch_too_large", "batch_negative"])),
        "cin": draw(st.integers(1, 4)), "cout": draw(st.sampled_from([1, 2, 4])),
        "fdtype": pick(st.sampled_from(["float32", "float32", "float64", "float16", "bfloat16"]),
                       st.sampled_from(["int32", "int64", "bool", "complex64"])),
        "idx": pick(st.sampled_from(["int32", "int32", "noncontig", "transposed"]),
                    st.sampled_from(["int64", "int16", "float", "uint8"])),
        "mutation": pick(st.one_of(st.none(), st.none(), st.sampled_from(VALID_MUTATIONS)), st.sampled_from(MUTATIONS)),
        "mutate_between": draw(st.one_of(st.none(), st.sampled_from(
            ["indices_permuted", "indices_other_valid", "indices_out_of_range", "shape_smaller",
             "batch_smaller"]))) if kind in ("subm_reuse", "inverse") else None,
        "layers": layers,
    }


VALID_MUTATIONS = ["indices_other_valid", "indices_permuted", "shape_larger", "batch_larger"]
MUTATIONS = ["indices_other_valid", "indices_out_of_range", "indices_negative", "indices_fewer_rows",
             "indices_more_rows", "indices_int64", "indices_permuted", "shape_smaller", "shape_larger",
             "shape_wrong_ndim", "shape_huge", "shape_zero", "batch_smaller", "batch_larger", "batch_float",
             "batch_negative", "replace_feature_rows"]


@st.composite
def raw_cases(draw):
    op = draw(st.sampled_from(RAW_OPS))
    ndim = draw(st.integers(1, 4))
    lists = lambda elems: st.lists(elems, min_size=ndim, max_size=ndim)  # noqa: E731
    maybe_wrong_len = lambda elems: st.one_of(lists(elems), lists(elems), st.lists(elems, min_size=0, max_size=6))  # noqa: E731
    return {
        "kind": "raw", "op": op, "seed": draw(st.integers(0, 2 ** 31)), "bad": draw(st.booleans()),
        "n": draw(st.integers(0, 12)), "m": draw(st.integers(0, 12)), "k": draw(st.integers(0, 9)),
        "c": draw(st.integers(1, 4)), "flag": draw(st.booleans()), "ndim": ndim,
        "shape": draw(lists(small_or_huge)),
        "out_shape": draw(maybe_wrong_len(small_or_huge)),
        "ksize": draw(maybe_wrong_len(st.integers(-1, 4))),
        "stride": draw(maybe_wrong_len(st.sampled_from([1, 2, 3, 0, -1, 2 ** 30]))),
        "padding": draw(maybe_wrong_len(st.sampled_from([0, 1, 2, -1, 2 ** 30]))),
        "dilation": draw(maybe_wrong_len(st.sampled_from([1, 2, 0, -1, 2 ** 30]))),
        "corrupt": draw(st.one_of(st.none(), st.sampled_from(
            ["duplicate", "negative", "too_large", "batch_too_large", "batch_negative"]))),
        "vsize": draw(maybe_wrong_len(st.sampled_from([0.5, 1.0, 0.0, -1.0, 1e-30, float("inf")]))),
        "dtypes": draw(st.tuples(st.sampled_from(["int32", "int64", "float32"]),
                                 st.sampled_from(["int32", "int64", "float32", "float64"]))),
    }


def _fuzz(session, strategy, default_examples, examples):
    def check(case):
        session.run(case)

    for ex in examples:
        check = example(ex)(check)
    _settings(default_examples)(given(strategy)(check))()
    assert not session.failures, session.report()


def _layer_example(layers, **kw):
    case = {"kind": "layer", "seed": 0, "ndim": 1, "shape": [4], "shape_type": "list", "batch": ["int", 1], "n": 2,
            "corrupt": None, "cin": 1, "cout": 1, "fdtype": "float32", "idx": "int32", "mutation": None,
            "mutate_between": None, "layers": layers}
    return dict(case, **kw)


# explicit cases, run first: one per defect class found when this test was written (see the findings file)
LAYER_EXAMPLES = [
    _layer_example([{"type": "conv", "groups": 1, "k": 3, "s": 1, "p": 1, "d": 1}], batch=["float", 1.5],
                   seed=8247),
    _layer_example([{"type": "avgpool", "k": 2, "s": 2, "p": 1, "d": 1}], mutation="indices_out_of_range"),
    _layer_example([{"type": "subm", "groups": 1, "k": 1, "s": 1, "p": 0, "d": 1}], corrupt="duplicate"),
    _layer_example([{"type": "subm", "key": "s", "k": 3, "d": 1}, {"type": "subm", "key": "s", "k": 3, "d": 1}],
                   mutate_between="indices_other_valid", shape=[6], n=3, seed=5),
    _layer_example([{"type": "subm", "groups": 1, "k": 5, "s": 1, "p": 0, "d": 2 ** 30}], shape=[6]),
    _layer_example([{"type": "maxpool", "k": 1, "s": 1, "p": 2 ** 31, "d": 1}], ndim=2, shape=[3, 3]),
]
RAW_EXAMPLES = [
    {"kind": "raw", "op": "gather_conv", "seed": 0, "bad": True, "n": 4, "m": 3, "k": 2, "c": 2, "flag": False,
     "ndim": 1, "shape": [4], "out_shape": [4], "ksize": [3], "stride": [1], "padding": [1], "dilation": [1],
     "corrupt": None, "vsize": [1.0], "dtypes": ["int32", "int32"]},
]


def test_fuzz_layers(session):
    """Random layers on random (valid, invalid, mutated) sparse tensors: correct result or an exception."""
    _fuzz(session, layer_cases(), 400, LAYER_EXAMPLES)


def test_fuzz_raw_ops(session):
    """Every torch.ops.spconv op with random arguments and out-of-range tables: never a signal."""
    _fuzz(session, raw_cases(), 150, RAW_EXAMPLES)


def test_worker_reports_a_signal_with_its_case():
    """The harness itself: a case that kills the worker fails the test naming that case."""
    w = Worker()
    try:
        status, detail = w.run({"kind": "layer", "__crash__": True})
    finally:
        w.close()
    assert status == "died" and "signal" in detail and "__crash__" in detail, detail


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker_main()
    elif sys.argv[1:2] == ["--run"]:
        _limit_memory()
        print(run_case(json.loads(sys.argv[2])))
    else:
        sys.exit("usage: test_fuzz.py --worker | --run '<case json>'")
