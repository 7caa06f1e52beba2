"""spconv's caching CPU allocator gives memory back: spconv.empty_cache() frees every cached block (RSS
drops), and blocks left over from a one-off peak are freed by themselves once smaller steady work follows.
Each check runs in a fresh process (RSS from /proc/self/statm)."""
import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import os, torch, spconv, spconv.pytorch
from spconv.pytorch import ops
assert ops.CACHING_ALLOCATOR
page = os.sysconf("SC_PAGE_SIZE")
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2 ** 20
"""


def _run(code, **env):
    full_env = dict(os.environ, SPCONV_CPU_CACHING_ALLOCATOR="1", **env)
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=full_env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), \
        f"exit code {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_empty_cache_returns_memory():
    out = _run("""
        start = rss_mb()
        # blocks of several sizes, some below glibc's 32 MB mmap threshold (they live in its heap)
        xs = [torch.ones(n) for n in [2_000_000, 3_000_000, 5_000_000, 12_000_000, 40_000_000] * 3]
        del xs
        stats = spconv.caching_allocator_stats()
        cached = stats["cached_bytes"] / 2 ** 20
        held = rss_mb()
        assert cached > 600 and held - start > 600, (cached, held, start)
        freed = spconv.empty_cache()
        after = rss_mb()
        stats = spconv.caching_allocator_stats()
        assert stats["cached_bytes"] == 0 and freed / 2 ** 20 > 600, (stats, freed)
        assert after - start < 100, (start, held, after)
        # the allocator still works (and caches again) afterwards
        a = torch.full((3_000_000,), 2.0); p = a.data_ptr(); del a
        b = torch.full((3_000_000,), 3.0)
        assert b.data_ptr() == p and float(b.sum()) == 9_000_000
        print(f"rss {start:.0f} -> {held:.0f} -> {after:.0f} MB; ok")
    """)
    print(out)


def test_empty_cache_without_caching_allocator():
    code = ("import spconv, spconv.pytorch, spconv._C; assert spconv._C.caching_allocator_stats() is None; "
            "assert spconv.empty_cache() == 0; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, SPCONV_CPU_CACHING_ALLOCATOR="0"))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("idle", ["allocs", "time"])
def test_one_off_peak_is_released_by_itself(idle):
    """After a 1.2 GB peak, steady work on 8 MB tensors: the peak's blocks are freed without an explicit call
    (they go unused for max_idle_allocs allocations and max_idle_ms), while the steady work keeps hitting the
    cache."""
    env = ({"SPCONV_CPU_CACHE_MAX_IDLE_ALLOCS": "200", "SPCONV_CPU_CACHE_MAX_IDLE_MS": "0"} if idle == "allocs"
           else {"SPCONV_CPU_CACHE_MAX_IDLE_ALLOCS": "0", "SPCONV_CPU_CACHE_MAX_IDLE_MS": "300"})
    out = _run("""
        import time
        start = rss_mb()
        peak = [torch.ones(50_000_000) for _ in range(6)]  # 6 x 200 MB, touched
        del peak
        s0 = spconv.caching_allocator_stats()
        held = rss_mb()
        assert s0["cached_bytes"] > 1000 * 2 ** 20, s0
        t0 = time.time()
        for step in range(2000):
            a = torch.ones(2_000_000)
            b = a * 2
            del a, b
            if step % 100 == 0:
                time.sleep(0.02)
        s1 = spconv.caching_allocator_stats()
        after = rss_mb()
        assert s1["cached_bytes"] < 64 * 2 ** 20, s1
        assert s1["idle_frees"] + s1["evictions"] >= 6, s1
        assert s1["hits"] - s0["hits"] > 3000, (s0, s1)  # the steady work is served from the cache
        assert after - start < 200, (start, held, after)
        print(f"cached {s0['cached_bytes'] / 2 ** 20:.0f} -> {s1['cached_bytes'] / 2 ** 20:.0f} MB, "
              f"rss {start:.0f} -> {held:.0f} -> {after:.0f} MB, {time.time() - t0:.1f} s; ok")
    """, **env)
    print(out)


def test_defaults_keep_steady_blocks():
    """With the default policy, blocks reused every step stay cached (hits, no idle frees)."""
    _run("""
        for step in range(300):
            xs = [torch.empty(n) for n in (1_000_000, 3_000_000, 9_000_000)]
            del xs
        s = spconv.caching_allocator_stats()
        assert s["misses"] <= 3 and s["hits"] >= 897 and s["idle_frees"] == 0, s
        assert s["live_bytes"] + s["cached_bytes"] <= 1.25 * s["peak_live_bytes"] + 2 ** 20
        print("ok")
    """)
