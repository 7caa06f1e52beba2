"""Kernel-map building in Triton: the same maps as ``src/kernel_map.cpp``, built on the device.

Sites are keyed by an int64 linear key ``((batch * s0 + c0) * s1 + c1) ...`` (batch slowest, last
dimension fastest, as ``linear_key`` in ``include/spconv/geometry.h``). The input sites go into an
open-addressing hash table (power-of-two capacity >= 2N, linear probing, slots claimed with
``tl.atomic_cas``; the value array holds the row). Every step is one kernel launch over all rows and
taps at once. Probes are bounded by the capacity: a full table (which the capacities below rule out)
sets an error flag instead of looping forever. The kernels write a small status vector (duplicate row,
table-full flag, number of output sites); the host reads it once per map (the one host sync: duplicate
sites and a full table raise, a strided/transposed conv needs its output count).

- ``build_subm_map``: nbr[j, r] = row of ``y - pad + o_r * dil`` (pad = (k // 2) * dil), or -1.
- ``build_conv_map``: the outputs every input reaches (a second hash set of output keys), sorted
  by key (= by (batch, coords)) with ``torch.sort``; then nbr[j, r] = row of the input feeding
  output j through tap r.
- ``invert_map``: inv[i, r] = the output fed by input i through tap r (each (i, r) has at most one).
"""
import math
from typing import Tuple

import torch
import triton
import triton.language as tl

from spconv.triton._runtime import INTERPRET, check_indices, geometry, next_pow2, on_tensor_device

_EMPTY = -1
# status vector (int32) written by the kernels, read once per map by the host
_DUP, _FULL, _COUNT = 0, 1, 2
# Lanes per program. A program of the per-tap kernels covers BLOCK // TAPS rows x TAPS taps (lane l is
# row l // TAPS, tap l % TAPS). The interpreter runs each program as Python, so it gets fewer, larger ones.
_BLOCK = 4096 if INTERPRET else 256


def _taps_per_program(kv: int) -> int:
    return min(next_pow2(kv), 32 if INTERPRET else 4)


@triton.jit
def _hash(key):
    """splitmix64 finaliser of an int64 key (same mixing as the CPU table)."""
    x = key.to(tl.uint64, bitcast=True)
    x ^= x >> 33
    x *= 0xFF51AFD7ED558CCD
    x ^= x >> 33
    x *= 0xC4CEB9FE1A85EC53
    x ^= x >> 33
    return x.to(tl.int64, bitcast=True)


@triton.jit
def _load_site(idx_ptr, rows, mask, NDIM: tl.constexpr):
    """(batch, c0, c1, c2, c3) as int64 of rows of an int32 [N, 1 + NDIM] index tensor (unused dims are 0)."""
    base = idx_ptr + rows.to(tl.int64) * (NDIM + 1)
    b = tl.load(base, mask=mask, other=0).to(tl.int64)
    c0 = tl.load(base + 1, mask=mask, other=0).to(tl.int64)
    c1 = tl.zeros_like(c0)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    if NDIM > 1:
        c1 = tl.load(base + 2, mask=mask, other=0).to(tl.int64)
    if NDIM > 2:
        c2 = tl.load(base + 3, mask=mask, other=0).to(tl.int64)
    if NDIM > 3:
        c3 = tl.load(base + 4, mask=mask, other=0).to(tl.int64)
    return b, c0, c1, c2, c3


@triton.jit
def _linear_key(b, c0, c1, c2, c3, shape_ptr, NDIM: tl.constexpr):
    """Linear key of (batch, coords) in the grid ``shape_ptr[0:NDIM]``."""
    key = b * tl.load(shape_ptr) + c0
    if NDIM > 1:
        key = key * tl.load(shape_ptr + 1) + c1
    if NDIM > 2:
        key = key * tl.load(shape_ptr + 2) + c2
    if NDIM > 3:
        key = key * tl.load(shape_ptr + 3) + c3
    return key


@triton.jit
def _tap_coord(c, geo_ptr, r, d: tl.constexpr, FROM_OUTPUT: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Coordinate in dimension d at the other end of tap r, and whether it exists.

    FROM_OUTPUT: c is an output coordinate y, the result the input x feeding it (``input_of`` in C++);
    otherwise c is an input x and the result the output y it reaches (``output_of``).
    """
    in_size = tl.load(geo_ptr + 0 * 4 + d)
    out_size = tl.load(geo_ptr + 1 * 4 + d)
    k = tl.load(geo_ptr + 2 * 4 + d)
    s = tl.load(geo_ptr + 3 * 4 + d)
    p = tl.load(geo_ptr + 4 * 4 + d)
    dil = tl.load(geo_ptr + 5 * 4 + d)
    div = tl.load(geo_ptr + 6 * 4 + d)
    o = (r // div) % k
    if FROM_OUTPUT != TRANSPOSED:  # multiply: x = y s - p + o d (regular) / y = x s - p + o d (transposed)
        v = c * s - p + o * dil
        ok = v >= 0
    else:  # divide: x = (y + p - o d) / s (transposed) / y = (x + p - o d) / s (regular), when exact
        t = c + p - o * dil
        tp = tl.maximum(t, 0)
        v = tp // s
        ok = (t >= 0) & (tp % s == 0)
    if FROM_OUTPUT:
        ok = ok & (v < in_size)
    else:
        ok = ok & (v < out_size)
    return v, ok


@triton.jit
def _tap_site(c0, c1, c2, c3, geo_ptr, r, NDIM: tl.constexpr, FROM_OUTPUT: tl.constexpr, TRANSPOSED: tl.constexpr):
    v0, ok = _tap_coord(c0, geo_ptr, r, 0, FROM_OUTPUT, TRANSPOSED)
    v1 = c1
    v2 = c2
    v3 = c3
    if NDIM > 1:
        v1, ok1 = _tap_coord(c1, geo_ptr, r, 1, FROM_OUTPUT, TRANSPOSED)
        ok = ok & ok1
    if NDIM > 2:
        v2, ok2 = _tap_coord(c2, geo_ptr, r, 2, FROM_OUTPUT, TRANSPOSED)
        ok = ok & ok2
    if NDIM > 3:
        v3, ok3 = _tap_coord(c3, geo_ptr, r, 3, FROM_OUTPUT, TRANSPOSED)
        ok = ok & ok3
    return v0, v1, v2, v3, ok


@triton.jit
def _hash_insert(keys_ptr, key, active, cap_mask):
    """Insert keys (lanes where ``active``); returns (slot, inserted, already_present, table_full) per lane.
    A lane gives up (``table_full``) after probing every slot."""
    slot = _hash(key) & cap_mask
    inserted = tl.zeros(key.shape, dtype=tl.int1)
    present = tl.zeros(key.shape, dtype=tl.int1)
    full = tl.zeros(key.shape, dtype=tl.int1)
    probes = tl.zeros(key.shape, dtype=tl.int32)  # per lane (a scalar counter trips the interpreter)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        # Inactive lanes compare against -2, which no slot ever holds: their CAS never writes.
        cmp = tl.where(active, -1, -2).to(tl.int64)
        old = tl.atomic_cas(keys_ptr + slot, cmp, key)
        ins = active & (old == -1)
        dup = active & (old == key)
        inserted = inserted | ins
        present = present | dup
        active = active & ~(ins | dup)
        probes += 1
        gave_up = active & (probes > cap_mask)  # every slot probed: the table is full
        full = full | gave_up
        active = active & ~gave_up
        slot = tl.where(active, (slot + 1) & cap_mask, slot)
    return slot, inserted, present, full


@triton.jit
def _hash_find(keys_ptr, vals_ptr, key, active, cap_mask):
    """Value stored for each key, or -1 (lanes where ``active``; others get -1). At most capacity probes."""
    slot = _hash(key) & cap_mask
    found = tl.full(key.shape, -1, tl.int32)
    probes = tl.zeros(key.shape, dtype=tl.int32)  # per lane (a scalar counter trips the interpreter)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        cur = tl.load(keys_ptr + slot, mask=active, other=-1)
        hit = active & (cur == key)
        found = tl.where(hit, tl.load(vals_ptr + slot, mask=hit, other=-1), found)
        probes += 1
        active = active & (cur != key) & (cur != -1)
        active = active & (probes <= cap_mask)  # stop after every slot was probed (only in a full table)
        slot = (slot + 1) & cap_mask
    return found


@triton.jit
def _insert_sites_kernel(idx_ptr, geo_ptr, keys_ptr, vals_ptr, status_ptr, n, cap_mask,
                         NDIM: tl.constexpr, BLOCK: tl.constexpr):
    """Insert the input sites: status[DUP] = max row that repeats a site, status[FULL] = 1 if the table filled."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = rows < n
    b, c0, c1, c2, c3 = _load_site(idx_ptr, rows, m, NDIM)
    key = _linear_key(b, c0, c1, c2, c3, geo_ptr, NDIM)  # geo row 0: the input shape
    slot, inserted, present, full = _hash_insert(keys_ptr, key, m, cap_mask)
    tl.store(vals_ptr + slot, rows, mask=inserted)
    tl.atomic_max(status_ptr + tl.zeros_like(rows), rows, mask=present)  # status[0]
    tl.atomic_max(status_ptr + 1 + tl.zeros_like(rows), tl.full(rows.shape, 1, tl.int32), mask=full)


@triton.jit
def _row_tap_lanes(n, kv, BLOCK: tl.constexpr, TAPS: tl.constexpr):
    """(row, tap, valid) of each lane of program (row block, tap block)."""
    lane = tl.arange(0, BLOCK)
    rows = tl.program_id(0) * (BLOCK // TAPS) + lane // TAPS
    r = tl.program_id(1) * TAPS + lane % TAPS
    return rows, r, (rows < n) & (r < kv)


@triton.jit
def _insert_outputs_kernel(idx_ptr, geo_ptr, keys_ptr, status_ptr, n, kv, cap_mask,
                           NDIM: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK: tl.constexpr, TAPS: tl.constexpr):
    """Insert the output key each input reaches through each tap: status[COUNT] += new keys, status[FULL]."""
    rows, r, m = _row_tap_lanes(n, kv, BLOCK, TAPS)
    b, c0, c1, c2, c3 = _load_site(idx_ptr, rows, m, NDIM)
    y0, y1, y2, y3, ok = _tap_site(c0, c1, c2, c3, geo_ptr, r, NDIM, False, TRANSPOSED)
    ok = ok & m
    key = _linear_key(b, y0, y1, y2, y3, geo_ptr + 4, NDIM)  # geo row 1: the output shape
    _, inserted, _, full = _hash_insert(keys_ptr, key, ok, cap_mask)
    tl.atomic_add(status_ptr + 2, tl.sum(inserted.to(tl.int32), axis=0))
    tl.atomic_max(status_ptr + 1 + tl.zeros_like(rows), tl.full(rows.shape, 1, tl.int32), mask=full)


@triton.jit
def _decode_kernel(keys_ptr, out_idx_ptr, geo_ptr, m_out, NDIM: tl.constexpr, BLOCK: tl.constexpr):
    """out_indices[j] = (batch, coords) of sorted output key j (grid ``geo`` row 1)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = rows < m_out
    key = tl.load(keys_ptr + rows, mask=m, other=0)
    base = out_idx_ptr + rows.to(tl.int64) * (NDIM + 1)
    if NDIM > 3:
        s = tl.load(geo_ptr + 4 + 3)
        tl.store(base + 4, (key % s).to(tl.int32), mask=m)
        key = key // s
    if NDIM > 2:
        s = tl.load(geo_ptr + 4 + 2)
        tl.store(base + 3, (key % s).to(tl.int32), mask=m)
        key = key // s
    if NDIM > 1:
        s = tl.load(geo_ptr + 4 + 1)
        tl.store(base + 2, (key % s).to(tl.int32), mask=m)
        key = key // s
    s = tl.load(geo_ptr + 4)
    tl.store(base + 1, (key % s).to(tl.int32), mask=m)
    tl.store(base, (key // s).to(tl.int32), mask=m)


@triton.jit
def _gather_map_kernel(out_idx_ptr, geo_ptr, keys_ptr, vals_ptr, nbr_ptr, m_out, kv, cap_mask,
                       NDIM: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK: tl.constexpr, TAPS: tl.constexpr):
    """nbr[j, r] = input row feeding output j through tap r, or -1."""
    rows, r, m = _row_tap_lanes(m_out, kv, BLOCK, TAPS)
    b, c0, c1, c2, c3 = _load_site(out_idx_ptr, rows, m, NDIM)
    x0, x1, x2, x3, ok = _tap_site(c0, c1, c2, c3, geo_ptr, r, NDIM, True, TRANSPOSED)
    key = _linear_key(b, x0, x1, x2, x3, geo_ptr, NDIM)
    found = _hash_find(keys_ptr, vals_ptr, key, ok & m, cap_mask)
    tl.store(nbr_ptr + rows.to(tl.int64) * kv + r, found, mask=m)


@triton.jit
def _invert_kernel(nbr_ptr, inv_ptr, m_out, kv, BLOCK: tl.constexpr, TAPS: tl.constexpr):
    """inv[nbr[j, r], r] = j."""
    rows, r, m = _row_tap_lanes(m_out, kv, BLOCK, TAPS)
    i = tl.load(nbr_ptr + rows.to(tl.int64) * kv + r, mask=m, other=-1)
    ok = m & (i >= 0)
    tl.store(inv_ptr + i.to(tl.int64) * kv + r, rows, mask=ok)


# ------------------------------------------------------------------------------------------------
def _capacity(entries: int) -> int:
    """Hash table slots for at most ``entries`` keys: a power of two, at least twice as many (load <= 1/2)."""
    return next_pow2(max(16, 2 * entries))


def _new_status(device) -> torch.Tensor:
    return torch.tensor([-1, 0, 0], dtype=torch.int32, device=device)  # [DUP, FULL, COUNT]


def _read_status(status: torch.Tensor, what: str):
    """The one host read of a map build: raises for duplicate sites or a full hash table; returns the count."""
    dup, full, count = status.tolist()
    if full:
        raise RuntimeError(f"spconv.triton: the hash table of {what} is full (every slot probed); its capacity is "
                           "sized to make this impossible, so this is a bug in spconv: please report it with the "
                           "layer's geometry and number of sites")
    if dup >= 0:
        raise ValueError(f"spconv: indices contain duplicate sites (row {dup} repeats another row's "
                         "(batch, coordinate)); merge duplicates first, e.g. with torch.unique(indices, dim=0, "
                         "return_inverse=True) and a scatter-add of the features")
    return count


def _site_table(indices: torch.Tensor, geo: torch.Tensor, ndim: int,
                status: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Hash table of the input sites: (keys int64 [cap], rows int32 [cap], cap_mask); duplicates and a full
    table are flagged in ``status`` (read by :func:`_read_status`)."""
    n = indices.shape[0]
    cap = _capacity(n)
    keys = torch.full((cap,), _EMPTY, dtype=torch.int64, device=indices.device)
    vals = torch.full((cap,), -1, dtype=torch.int32, device=indices.device)
    if n:
        _insert_sites_kernel[(triton.cdiv(n, _BLOCK),)](indices, geo, keys, vals, status, n, cap - 1, NDIM=ndim,
                                                        BLOCK=_BLOCK)
    return keys, vals, cap - 1


def _lookup_table(out_indices, geo, keys, vals, cap_mask, kv, ndim, transposed) -> torch.Tensor:
    m = out_indices.shape[0]
    nbr = torch.empty((m, kv), dtype=torch.int32, device=out_indices.device)
    if m:
        taps = _taps_per_program(kv)
        grid = (triton.cdiv(m, _BLOCK // taps), triton.cdiv(kv, taps))
        _gather_map_kernel[grid](out_indices, geo, keys, vals, nbr, m, kv, cap_mask, NDIM=ndim, TRANSPOSED=transposed,
                                 BLOCK=_BLOCK, TAPS=taps)
    return nbr


@on_tensor_device
def build_subm_map(indices: torch.Tensor, spatial_shape, ksize, dilation, batch_size=None) -> torch.Tensor:
    """Output-major SubM neighbour table ``[N, K]`` int32 (output sites == input sites)."""
    ndim = len(spatial_shape)
    indices = check_indices(indices, ndim)
    pad = [(int(k) // 2) * int(d) for k, d in zip(ksize, dilation)]
    geo = geometry(indices.device, ndim, spatial_shape, spatial_shape, ksize, [1] * ndim, pad, dilation)
    kv = 1
    for k in ksize:
        kv *= int(k)
    status = _new_status(indices.device)
    keys, vals, cap_mask = _site_table(indices, geo, ndim, status)
    if indices.shape[0]:
        _read_status(status, "input sites")
    return _lookup_table(indices, geo, keys, vals, cap_mask, kv, ndim, False)


def _outputs_per_input(ksize, stride, dilation, transposed: bool) -> int:
    """Upper bound on the outputs one input reaches (sizes the output hash set), as the CPU builder."""
    bound = 1
    for k, s, d in zip(ksize, stride, dilation):
        taps = k if transposed else min(k, (k * math.gcd(d, s) + s - 1) // s)
        bound *= max(taps, 1)
    return bound


@on_tensor_device
def build_conv_map(indices: torch.Tensor, in_shape, out_shape, ksize, stride, padding, dilation,
                   transposed: bool, batch_size=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Regular or transposed conv: ``(out_indices [M, 1+D] sorted by (batch, coords), table [M, K])``."""
    ndim = len(in_shape)
    indices = check_indices(indices, ndim)
    transposed = bool(transposed)
    geo = geometry(indices.device, ndim, in_shape, out_shape, ksize, stride, padding, dilation)
    kv = 1
    for k in ksize:
        kv *= int(k)
    n = indices.shape[0]
    status = _new_status(indices.device)
    keys, vals, cap_mask = _site_table(indices, geo, ndim, status)

    out_cap = _capacity(n * _outputs_per_input(ksize, stride, dilation, transposed))
    out_keys = torch.full((out_cap,), _EMPTY, dtype=torch.int64, device=indices.device)
    m = 0
    if n:
        taps = _taps_per_program(kv)
        grid = (triton.cdiv(n, _BLOCK // taps), triton.cdiv(kv, taps))
        _insert_outputs_kernel[grid](indices, geo, out_keys, status, n, kv, out_cap - 1, NDIM=ndim,
                                     TRANSPOSED=transposed, BLOCK=_BLOCK, TAPS=taps)
        m = _read_status(status, "input sites or output sites")  # the one host sync: errors and output count
        # compaction on the device at the known count (a boolean mask index would sync again)
        valid = out_keys != _EMPTY
        dest = torch.where(valid, torch.cumsum(valid, 0) - 1, m)  # slot m collects the empty slots
        compact = torch.empty(m + 1, dtype=torch.int64, device=indices.device)
        compact.scatter_(0, dest, out_keys)
        out_keys = torch.sort(compact[:m]).values
    else:
        out_keys = out_keys[:0]
    out_indices = torch.empty((m, ndim + 1), dtype=torch.int32, device=indices.device)
    if m:
        _decode_kernel[(triton.cdiv(m, _BLOCK),)](out_keys, out_indices, geo, m, NDIM=ndim, BLOCK=_BLOCK)
    nbr = _lookup_table(out_indices, geo, keys, vals, cap_mask, kv, ndim, transposed)
    return out_indices, nbr


@on_tensor_device
def invert_map(table: torch.Tensor, num_inputs: int) -> torch.Tensor:
    """Input-major table ``[num_inputs, K]`` of an output-major one."""
    if table.dim() != 2 or table.dtype != torch.int32:
        raise ValueError("spconv: nbr must be an int32 [M, K] tensor")
    table = table.contiguous()
    m, kv = table.shape
    inv = torch.full((int(num_inputs), kv), -1, dtype=torch.int32, device=table.device)
    if m and kv:
        taps = _taps_per_program(kv)
        _invert_kernel[(triton.cdiv(m, _BLOCK // taps), triton.cdiv(kv, taps))](table, inv, m, kv, BLOCK=_BLOCK,
                                                                               TAPS=taps)
    return inv
