"""Torch work on helper threads beside a busy main thread (training's prefetch, evaluation's prepare).

``torch.set_num_threads`` sets the calling thread's intra-op count and the default that threads take
when they first run torch; a thread that has already read its count keeps it. A helper thread that runs
torch with the process's count starts a second OpenMP team beside the main thread's, more threads than
cores; so helpers call ``torch.set_num_threads(1)`` first, inside :func:`helpers_on_one_thread`, which
fixes the calling thread's count before they lower the default and sets the default back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def helpers_on_one_thread() -> Iterator[None]:
    """For the block: this thread keeps its torch thread count while the helper threads it starts set
    theirs to 1 (``torch.set_num_threads(1)`` first thing); after it, new threads get this count again."""
    threads = torch.get_num_threads()  # read here: fixes this thread's count before a helper lowers the default
    try:
        yield
    finally:
        torch.set_num_threads(threads)
