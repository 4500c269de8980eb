"""Counting the HTTP requests this process sends (the round-trip figures of
benchmarks/throughput_bench.py and tests/audit/test_round_trips.py). Local measuring only."""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import SplitResult, urlsplit

import requests.adapters

Classify = Callable[[str, SplitResult], str]


@contextlib.contextmanager
def counting_requests(classify: Classify) -> Iterator[Counter[str]]:
    """While open, every request an SDK client of this process sends (they all go through
    requests' ``HTTPAdapter``) is counted under ``classify(method, url parts)``."""
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    original = requests.adapters.HTTPAdapter.send

    def send(adapter: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        kind = classify(str(request.method), urlsplit(request.url))
        with lock:
            counts[kind] += 1
        return original(adapter, request, *args, **kwargs)

    requests.adapters.HTTPAdapter.send = send  # type: ignore[method-assign,assignment]  # a counting wrapper, same call
    try:
        yield counts
    finally:
        requests.adapters.HTTPAdapter.send = original  # type: ignore[method-assign]  # restored
