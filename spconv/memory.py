"""Memory held by spconv's caching CPU allocator (src/cpu_allocator.cpp).

Importing ``spconv.pytorch`` installs a caching allocator for CPU tensors of 1 MB and more (unless
``SPCONV_CPU_CACHING_ALLOCATOR=0``): freed blocks are kept and handed out again for tensors of the same
size. It gives memory back by itself: blocks not reused for a while (1000 large allocations and 2 s, see
``SPCONV_CPU_CACHE_MAX_IDLE_ALLOCS`` / ``SPCONV_CPU_CACHE_MAX_IDLE_MS``) are freed, and the cache is kept
within 1.25x the recent peak of live memory. :func:`empty_cache` frees every cached block at once, like
``torch.cuda.empty_cache``.
"""
from typing import Dict, Optional


def empty_cache() -> int:
    """Returns every block cached by spconv's CPU caching allocator to the system (tensors still alive are
    untouched) and trims the C heap; returns the number of cached bytes released (0 when the caching
    allocator is not installed)."""
    import spconv._C as _C
    return int(_C.empty_cache())


def caching_allocator_stats() -> Optional[Dict[str, int]]:
    """Counters of the caching allocator (``hits``, ``misses``, ``evictions``, ``live_bytes``,
    ``cached_bytes``, ``peak_live_bytes``, ``recent_peak_live_bytes``, ``idle_frees``), or None when it is
    not installed."""
    import spconv._C as _C
    return _C.caching_allocator_stats()
