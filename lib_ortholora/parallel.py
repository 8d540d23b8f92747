"""Layers spread over worker threads: many small per-layer torch ops scale far better across layers
than inside each op. `layer_parallelism` lowers torch's (process-wide) thread count to one only
while some section is open; `parallel_map` maps a function over layers in that many threads."""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterable, Iterator, TypeVar

import torch

_T = TypeVar("_T")
_R = TypeVar("_R")

_WORKERS: ContextVar[int | None] = ContextVar("ortholora_layer_workers", default=None)
_THREADS = threading.Lock()  # guards the two below
_users = 0  # layer_parallelism sections open now, in any thread
_saved = 0  # torch's thread count before the first of them began


@contextmanager
def layer_parallelism() -> Iterator[int]:
    """Inside, torch ops of this thread and of `parallel_map`'s workers run single-threaded, and
    `parallel_map` spreads layers over as many worker threads as torch had threads before (nested
    uses keep the outer count); yields that count. Many small per-layer ops scale far better across
    layers than inside each op, and never oversubscribe a busy machine.

    torch's thread count is also the default of every thread started later, process-wide; sections
    overlapping in several threads (two API requests) share the count saved by the first, and each
    puts it back on leaving, so the process never keeps one thread."""
    global _users, _saved
    workers = _WORKERS.get()
    if workers is not None:
        yield workers
        return
    with _THREADS:
        if _users == 0:
            _saved = torch.get_num_threads()
        _users += 1
        workers = _saved
        torch.set_num_threads(1)
    token = _WORKERS.set(workers)
    try:
        yield workers
    finally:
        _WORKERS.reset(token)
        with _THREADS:
            _users -= 1
            torch.set_num_threads(workers)


def parallel_map(fn: Callable[[_T], _R], items: Iterable[_T], ahead: int | None = None) -> Iterator[_R]:
    """fn over items, in order, under `layer_parallelism`; at most `ahead` (default: two per
    worker) items are drawn from `items` ahead of the results (items may be big tensors)."""
    with layer_parallelism() as workers:
        if workers <= 1:
            yield from map(fn, items)
            return
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            pending: deque[Future[_R]] = deque()
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= (ahead or 2 * workers):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
