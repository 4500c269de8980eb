"""Fault injection: make chosen requests fail the way a busy or broken service does.

A rule names a ``kind``:

- ``"429"``: answer ``429 Too Many Requests`` with ``Retry-After`` (default 1 s);
- ``"503"``: answer ``503 Service Unavailable`` (with ``Retry-After`` if ``retry_after`` is set);
- ``"drop"``: close the connection without any response;
- ``"delay"``: wait ``delay`` seconds, then answer normally;

and which requests it hits: ``method`` (``"*"`` or e.g. ``"GET"``) and ``path``, a
shell-style glob on the path without query (``*`` also matches ``/``; e.g. ``/keys/*/create``).
``count`` limits how many times it fires (default: no limit); ``rate`` (0-1, default 1) is
the probability it fires on a matching request. The first rule that fires wins. Faults apply
only to requests that carry a valid token: the SDK's unauthenticated challenge round-trip is
never faulted, so counts are predictable.

``phase`` says when the fault strikes:

- ``"before"`` (default): instead of the operation; nothing changes in the HSM.
- ``"after"``: the operation runs to its end first (a create or import commits its new
  version, a delete deletes, a refusal is still a refusal), then the reply is lost (``drop``),
  replaced by the ``429``/``503`` (``429``, ``503``) or sent ``delay`` seconds late
  (``delay``). This is "done, but the reply was lost": what a client must survive without
  assuming a failed request had no effect. The request log records the operation's own status
  as ``operation_status``.
"""

from __future__ import annotations

import fnmatch
import random
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .errors import BadParameterError

KINDS = ("429", "503", "drop", "delay")
PHASES = ("before", "after")
MAX_DELAY_SECONDS = 60.0
_FIELDS = frozenset({"kind", "method", "path", "count", "rate", "retry_after", "delay", "phase"})
_METHODS = frozenset({"*", "GET", "PUT", "POST", "PATCH", "DELETE"})


@dataclass
class FaultRule:
    """One rule and its counters (``matched``: requests it matched; ``fired``: times applied)."""

    id: int
    kind: str
    method: str = "*"
    path: str = "*"
    count: int | None = None
    rate: float = 1.0
    retry_after: int | None = None
    delay: float = 0.0
    phase: str = "before"
    matched: int = 0
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.method in ("*", method) and fnmatch.fnmatchcase(path, self.path)

    @property
    def exhausted(self) -> bool:
        return self.count is not None and self.fired >= self.count

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _number(doc: Mapping[str, Any], name: str) -> float | None:
    value = doc.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadParameterError(f"fault rule {name} must be a number", reason="bad_fault_rule")
    return float(value)


def parse_rule(doc: object, *, rule_id: int) -> FaultRule:
    """Validate a rule given as JSON (see the module docstring).

    Raises:
        BadParameterError: reason ``bad_fault_rule``.
    """
    if not isinstance(doc, dict):
        raise BadParameterError("a fault rule must be a JSON object", reason="bad_fault_rule")
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise BadParameterError(
            f"unknown fault rule field(s): {', '.join(unknown)}", reason="bad_fault_rule"
        )
    kind = str(doc.get("kind"))
    if kind not in KINDS:
        raise BadParameterError(
            f"fault kind must be one of {', '.join(KINDS)}", reason="bad_fault_rule"
        )
    method = str(doc.get("method", "*")).upper()
    if method not in _METHODS:
        raise BadParameterError(
            f"fault method {method!r} is not supported", reason="bad_fault_rule"
        )
    path = doc.get("path", "*")
    if not isinstance(path, str) or not path:
        raise BadParameterError("fault path must be a non-empty glob", reason="bad_fault_rule")
    count = _number(doc, "count")
    if count is not None and (count < 1 or count != int(count)):
        raise BadParameterError("fault count must be a positive integer", reason="bad_fault_rule")
    rate = _number(doc, "rate")
    if rate is not None and not 0 < rate <= 1:
        raise BadParameterError("fault rate must be in (0, 1]", reason="bad_fault_rule")
    retry_after = _number(doc, "retry_after")
    if retry_after is not None and (retry_after < 0 or retry_after != int(retry_after)):
        raise BadParameterError("retry_after must be whole seconds >= 0", reason="bad_fault_rule")
    if kind == "429" and retry_after is None:
        retry_after = 1
    delay = _number(doc, "delay") or 0.0
    if kind == "delay" and not 0 < delay <= MAX_DELAY_SECONDS:
        raise BadParameterError(
            f"a delay fault needs delay in (0, {MAX_DELAY_SECONDS:g}] seconds",
            reason="bad_fault_rule",
        )
    phase = doc.get("phase", "before")
    if phase not in PHASES:
        raise BadParameterError(
            f"fault phase must be one of {', '.join(PHASES)}", reason="bad_fault_rule"
        )
    return FaultRule(
        id=rule_id,
        kind=kind,
        method=method,
        path=path,
        count=None if count is None else int(count),
        rate=1.0 if rate is None else rate,
        retry_after=None if retry_after is None else int(retry_after),
        delay=delay,
        phase=str(phase),
    )


class FaultInjector:
    """Thread-safe rule set. ``seed`` makes rate-based faults reproducible."""

    def __init__(self, *, seed: int | None = None) -> None:
        self._rules: list[FaultRule] = []
        self._next_id = 1
        self._lock = threading.Lock()
        self._rng = random.Random(seed)  # noqa: S311  # fault rates need reproducible, non-secret draws

    def add(self, doc: object) -> FaultRule:
        """Add a rule (validated by :func:`parse_rule`) and return it with its id.

        Raises:
            BadParameterError: reason ``bad_fault_rule``.
        """
        with self._lock:
            rule = parse_rule(doc, rule_id=self._next_id)
            self._next_id += 1
            self._rules.append(rule)
            return rule

    def remove(self, rule_id: int) -> bool:
        """Remove one rule; False if there is none with that id."""
        with self._lock:
            before = len(self._rules)
            self._rules = [r for r in self._rules if r.id != rule_id]
            return len(self._rules) != before

    def clear(self) -> None:
        with self._lock:
            self._rules = []

    def rules(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.to_json() for r in self._rules]

    def pick(self, method: str, path: str) -> FaultRule | None:
        """The rule that fires for this request (counters updated), or None."""
        with self._lock:
            for rule in self._rules:
                if rule.exhausted or not rule.matches(method, path):
                    continue
                rule.matched += 1
                if rule.rate < 1 and self._rng.random() >= rule.rate:
                    continue
                rule.fired += 1
                return FaultRule(**asdict(rule))
        return None
