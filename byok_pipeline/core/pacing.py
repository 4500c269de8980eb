"""Client-side pacing of import PUTs: a token bucket that learns from the HSM's 429s.

Managed HSM admits about one key creation (an import creates a key version) per second per
partition (Microsoft's scaling guidance; plan for 2 of the 3 partitions). Sending faster only
earns 429s. Each process keeps one :class:`ImportPacer` per HSM:

- tokens refill at ``rate`` per second, at most ``burst`` banked;
- a 429 to a PUT the pacer timed takes 5% off the rate (never below ``floor``) and empties
  the bucket (multiplicative decrease). The throttled PUT itself waits the service's
  ``Retry-After`` and then goes again without a token, and a 429 to such a retry teaches the
  pacer nothing (the caller does both: the HSM throttles per partition, which a client cannot
  see; the service knows when that partition admits the PUT, a retry queued behind other
  partitions' first tries would leave its own partition idle, and a retry's 429 says nothing
  about the pace of new PUTs);
- each accepted import adds ``step`` (a tenth of the ceiling) back, up to the ceiling
  (additive increase). The decrease is gentle on purpose: a 429 costs the HSM nothing (it is
  not counted against its limits), while a rate cut idles every partition; measured in
  benchmarks/throughput_bench.py (a quarter off per 429 drained a burst ~1.6x slower).

Pure: the clock is injected; the caller decides whether to sleep the returned wait (and how long
it can afford to), so the pacer itself never blocks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


@dataclass(frozen=True)
class PacerState:
    """A snapshot for status views and benchmarks."""

    rate: float
    ceiling: float
    throttled: int


class ImportPacer:
    """Token bucket with AIMD rate (see module docstring). Thread-safe."""

    def __init__(
        self,
        ceiling: float,
        *,
        burst: float = 1.0,
        floor_fraction: float = 0.05,
        decrease: float = 0.95,
        clock: Clock = time.monotonic,
    ) -> None:
        if ceiling <= 0:
            raise ValueError("the import rate must be positive")
        self.ceiling = ceiling
        self.floor = ceiling * floor_fraction
        self.step = ceiling / 10
        self.decrease = decrease
        self.burst = max(1.0, burst)
        self._clock = clock
        self._lock = threading.Lock()
        self._rate = ceiling
        self._tokens = self.burst
        self._stamp = clock()
        self._throttled = 0

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def reserve(self) -> float:
        """Take the next token: 0 when one is available now, else the seconds to wait before
        sending. The token is taken either way (callers that give up call :meth:`cancel`)."""
        with self._lock:
            now = self._clock()
            self._refill(now)
            self._tokens -= 1.0
            return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    def cancel(self) -> None:
        """Give back a token taken by :meth:`reserve` that was not used."""
        with self._lock:
            self._tokens = min(self.burst, self._tokens + 1.0)

    def throttled(self) -> None:
        """The HSM answered 429: slow down (the throttled request waits its Retry-After)."""
        with self._lock:
            self._refill(self._clock())
            self._throttled += 1
            self._rate = max(self.floor, self._rate * self.decrease)
            self._tokens = min(self._tokens, 0.0)

    def accepted(self) -> None:
        """An import went through: creep back towards the ceiling."""
        with self._lock:
            self._refill(self._clock())
            self._rate = min(self.ceiling, self._rate + self.step)

    def state(self) -> PacerState:
        with self._lock:
            return PacerState(rate=self._rate, ceiling=self.ceiling, throttled=self._throttled)


_PACERS: dict[tuple[str, float], ImportPacer] = {}
_PACERS_LOCK = threading.Lock()


def pacer_for(hsm_host: str, rate: float) -> ImportPacer:
    """This process's pacer for one HSM (one per host and configured rate)."""
    with _PACERS_LOCK:
        pacer = _PACERS.get((hsm_host, rate))
        if pacer is None:
            pacer = _PACERS[(hsm_host, rate)] = ImportPacer(rate)
        return pacer
