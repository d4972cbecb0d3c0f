"""A progress callback from the CLI's progress-bar factory, or none (library use, tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_context(progress_factory: Callable | None, description: str) -> Iterator:
    """Yield an ``update(done, total)`` callback (or None) from a CLI progress-bar factory."""
    if progress_factory is None:
        yield None
        return
    bar, update = progress_factory(description)
    with bar:
        yield update
