"""``byok watch``: the local stand-in for Event Grid.

It lists the incoming container, turns each blob into a BlobCreated event and hands it to the
same handler the blob trigger calls. Delivery is at-least-once, as with Event Grid: a blob still
in the container on the next poll (a transient failure, or a worker that was busy) is delivered
again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from byok_pipeline.processing.processor import Deps, Outcome, process_blob

Report = Callable[[str, Outcome | None, Exception | None], None]


@dataclass
class WatchStats:
    delivered: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    redeliveries: int = 0
    #: blobs whose last delivery left them waiting for approvals (settled until people act)
    awaiting: set[str] = field(default_factory=set)


def _deliver(
    name: str, deps: Deps, report: Report, stats: WatchStats, lock: threading.Lock
) -> bool:
    try:
        outcome = process_blob(name, deps)
    except Exception as exc:  # noqa: BLE001  # one bad blob must not stop the runner; it is redelivered
        with lock:
            stats.redeliveries += 1
        report(name, None, exc)
        return False
    with lock:
        stats.delivered += 1
        stats.outcomes[outcome.state] = stats.outcomes.get(outcome.state, 0) + 1
        if outcome.state == "awaiting_approval":
            stats.awaiting.add(name)
        else:
            stats.awaiting.discard(name)
    report(name, outcome, None)
    return True


def watch(
    deps: Deps,
    *,
    once: bool,
    interval: float = 2.0,
    workers: int = 1,
    report: Report,
    stop: threading.Event | None = None,
    max_rounds: int | None = None,
) -> WatchStats:
    """Poll and deliver until ``stop`` is set; with ``once``, until incoming holds nothing but
    packages awaiting approval (or ``max_rounds`` polls, default BYOK_MAX_ATTEMPTS + 2, have
    passed). Packages awaiting approval are delivered again at each poll (that is how a later
    approval is noticed), once per poll."""
    stop = stop or threading.Event()
    stats = WatchStats()
    lock = threading.Lock()
    rounds = 0
    limit = max_rounds if max_rounds is not None else deps.settings.max_attempts + 2
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="byok-worker") as pool:
        while not stop.is_set():
            names = deps.store.list_incoming()
            rounds += 1
            if once and rounds > 1:
                names = [n for n in names if n not in stats.awaiting]
            if names:
                results = list(pool.map(lambda n: _deliver(n, deps, report, stats, lock), names))
                pending = not all(results)
            else:
                pending = False
            if once and (not names or rounds >= limit):
                break
            if once and not pending:
                continue  # everything delivered; poll again at once to confirm incoming is empty
            stop.wait(interval if not once else min(interval, deps.settings.retry_backoff_max))
    return stats


def run_forever(deps: Deps, *, interval: float, workers: int, report: Report) -> WatchStats:
    """Watch until Ctrl-C."""
    stop = threading.Event()
    try:
        return watch(deps, once=False, interval=interval, workers=workers, report=report, stop=stop)
    except KeyboardInterrupt:
        stop.set()
        time.sleep(0)
        return WatchStats()
