"""How many CPU threads torch's kernels use while curvdiag computes (``--threads``, ``threads=``).

torch's default is one thread per core. On a machine other jobs share, those threads wait for
cores the other jobs hold, and every kernel waits for its slowest thread. Measured on a 2-core
machine shared with other work (benchmarks/bench_threads.py: λmax of the bundled BatchNorm CNN,
8 products, medians of fresh processes, 1 thread and the default interleaved):

- moderately shared (1-minute load 1.5–3.5, no extra job): 1 thread 0.56 s, the default (2)
  4.5 s, and up to 16 s (threads_results.json, "idle");
- oversubscribed (load 8–12, with or without a second job multiplying matrices): the same
  within the noise, 2.6 s against 2.2 s and 5.3 s against 5.4 s (threads_results_round2.json).

So the default, ``"default"``, is one thread: it removes the collapse and costs nothing
measurable here, and the numbers do not depend on the machine's load (a thread count changes
the order of floating-point sums). A machine of idle cores and a large model is faster with
``--threads N``. ``OMP_NUM_THREADS``, when set (torchrun sets it to 1), is the user's choice
and is kept.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Union

import torch

from curvdiag.errors import BadArgument

DEFAULT_THREADS = 1
Threads = Union[int, str, None]  # a count, "default", or None: leave torch's setting alone


def resolve_threads(threads: Threads) -> Optional[int]:
    """The thread count ``threads`` asks for (None: leave torch alone): ``"default"`` is
    :data:`DEFAULT_THREADS` unless ``OMP_NUM_THREADS`` is set; BadArgument unless ``threads`` is
    None, ``"default"`` or an int ≥ 1."""
    if threads is None:
        return None
    if threads == "default":
        return None if os.environ.get("OMP_NUM_THREADS") else DEFAULT_THREADS
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise BadArgument("threads", threads, "must be a whole number ≥ 1 (or \"default\", or None)")
    return threads


@contextlib.contextmanager
def torch_threads(threads: Threads) -> Iterator[int]:
    """Run the block with ``threads`` (see :func:`resolve_threads`); torch's setting comes back
    afterwards. Yields the count in use."""
    count = resolve_threads(threads)
    before = torch.get_num_threads()
    if count is not None and count != before:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
