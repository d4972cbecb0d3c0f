"""glibc allocator settings for processes that run the Approximant engine.

The engine allocates and frees frame-batch-sized complex tensors (up to ~13 MB at 128², M = 12)
for every chunk of every pass. With glibc's defaults the heap top is trimmed and large chunks are
mmap-ed, so many of those come back as fresh pages from the kernel, and the page faults cost as
much as the arithmetic: one angle at 128², M = 12 took 0.51 s with the defaults against 0.35 s
with the thresholds raised (docs/approximant.md). Dask's nanny makes it worse
(``MALLOC_TRIM_THRESHOLD_=65536``: 2.6× slower in a worker). Raising the trim and mmap
thresholds keeps freed memory in the process for reuse; the cost is that a process's RSS stays
at its high-water mark instead of shrinking between angles.

Set ``APT_STREAM_MALLOC_TUNING=0`` to leave the allocator as it is.
"""

from __future__ import annotations

import os

_DONE: list[bool] = []


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds once per process; True if they were set."""
    if _DONE:
        return _DONE[0]
    applied = False
    if os.environ.get("APT_STREAM_MALLOC_TUNING", "1").strip() not in ("0", "false", "no"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_threshold = -1, -3
            applied = bool(libc.mallopt(m_trim_threshold, 1 << 30))
            # 32 MiB is glibc's largest mmap threshold on 64 bit
            applied = bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and applied
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
            applied = False
    _DONE.append(applied)
    return applied
