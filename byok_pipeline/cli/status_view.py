"""What ``byok status`` and ``byok watch`` print for people: a table that fits 100 columns, a
detail view with the history and what to do, watch lines with time and attempt. Pure: the
callers fetch the documents and pass the clock; colour only when asked (a terminal without
NO_COLOR)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from byok_pipeline.core.reasons import REASONS
from byok_pipeline.core.status import STATES, StatusDoc, parse_time

WAITING = "waiting"
#: every state ``byok status --state`` accepts
LISTED_STATES = (WAITING, *STATES)
_COLOURS = {
    "imported": "32",
    "duplicate": "36",
    "rejected": "31",
    "failed": "31;1",
    "verification_failed": "31;1",
    "awaiting_approval": "33",
    WAITING: "33",
}


def use_colour(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """Colour only on a terminal, and never with NO_COLOR set (https://no-color.org)."""
    env = os.environ if env is None else env
    return "NO_COLOR" not in env and stream.isatty()


def _paint(text: str, state: str, colour: bool) -> str:
    code = _COLOURS.get(state)
    return f"\033[{code}m{text}\033[0m" if colour and code else text


def age(since: datetime | None, now: datetime) -> str:
    """``42s``, ``7m``, ``3h``, ``2d``; ``-`` when unknown."""
    if since is None:
        return "-"
    seconds = max(0, int((now - since).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class Row:
    """One line of ``byok status``: a status document, or a blob still waiting in incoming."""

    name: str
    state: str
    reason: str | None
    attempts: int | None
    since: datetime | None
    doc: StatusDoc | None = None

    def to_json(self) -> dict[str, Any]:
        if self.doc is not None:
            return self.doc.summary()
        waited = self.since.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if self.since else None
        return {"blob_name": self.name, "state": WAITING, "reason_code": None, "dropped": waited}


def rows(
    docs: Iterable[StatusDoc],
    waiting: Iterable[tuple[str, datetime | None]],
    *,
    state: str | None = None,
) -> list[Row]:
    """Status documents and waiting blobs (not delivered yet: no document names them), oldest
    first; only ``state`` when given."""
    out: list[Row] = []
    named: set[str] = set()
    for doc in docs:
        named.add(doc.blob_name)
        when = parse_time(doc.drop_time) or (
            parse_time(doc.history[0].time) if doc.history else None
        )
        out.append(Row(doc.blob_name, doc.state or "", doc.reason_code, doc.attempts, when, doc))
    for name, when in waiting:
        if name not in named:
            out.append(Row(name, WAITING, None, None, when))
    if state is not None:
        out = [r for r in out if r.state == state]
    epoch = datetime.min.replace(tzinfo=UTC)
    return sorted(out, key=lambda r: (r.since or epoch, r.name))


def table(listed: list[Row], now: datetime, max_attempts: int, *, colour: bool = False) -> str:
    """Columns NAME, STATE, REASON, ATTEMPTS, AGE within 100 characters, then counts per state."""
    header = f"{'NAME':<36} {'STATE':<19} {'REASON':<27} {'TRIES':>5} {'AGE':>6}"
    lines = [header]
    for r in listed:
        name = r.name if len(r.name) <= 36 else r.name[:35] + "~"
        name = name.encode("unicode_escape").decode("ascii")[:36]  # no control characters
        tries = f"{r.attempts}/{max_attempts}" if r.attempts is not None else "-"
        state = _paint(f"{r.state:<19}", r.state, colour)
        lines.append(
            f"{name:<36} {state} {(r.reason or '-')[:27]:<27} {tries:>5} {age(r.since, now):>6}"
        )
    counts = Counter(r.state for r in listed)
    footer = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no packages"
    lines.append(f"{len(listed)} package{'s' if len(listed) != 1 else ''}: {footer}")
    return "\n".join(lines)


def detail(doc: StatusDoc, now: datetime, max_attempts: int, *, colour: bool = False) -> str:
    """``byok status NAME``: where the package is, its history, the message and what to do."""
    state = doc.state or ""
    lines = [
        f"{doc.blob_name.encode('unicode_escape').decode('ascii')}: "
        + _paint(state, state, colour)
        + (f" [{doc.reason_code}]" if doc.reason_code else ""),
        f"  key name:      {doc.key_name or '-'}",
        f"  package:       {doc.package_sha256 or '-'}",
        f"  correlation:   {doc.correlation_id}",
        f"  attempts:      {doc.attempts}/{max_attempts}",
    ]
    if doc.imported_kid:
        lines.append(f"  imported kid:  {doc.imported_kid}")
    if doc.fingerprint_result:
        lines.append(f"  fingerprint:   {doc.fingerprint_result}")
    if doc.disposition:
        lines.append(f"  moved to:      {doc.disposition}")
    lines.append("  history:")
    for entry in doc.history:
        when = parse_time(entry.time)
        lines.append(
            f"    {entry.time}  {entry.state:<19} attempt {entry.attempt}  ({age(when, now)} ago)"
        )
    if doc.throttled_until and not doc.terminal:
        lines.append(f"waiting: throttled by the HSM, next try at {doc.throttled_until}")
    if doc.last_error and not doc.terminal:
        lines.append(f"last error: {doc.last_error}")
    if doc.message:
        lines.append(f"message: {doc.message}")
    if doc.reason_code:
        lines.append(f"what to do: {REASONS.get(doc.reason_code, 'see `byok reasons`')}")
    return "\n".join(lines)


def clock_time(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%H:%M:%S")


def watch_outcome(name: str, state: str, reason: str | None, now: datetime, *, colour: bool) -> str:
    """One ``byok watch`` line for a package that reached a state."""
    shown = name.encode("unicode_escape").decode("ascii")
    return f"{clock_time(now)} {shown}: {_paint(state, state, colour)}" + (
        f" [{reason}]" if reason else ""
    )


def watch_retry(
    name: str,
    message: str,
    now: datetime,
    *,
    attempt: int | None,
    max_attempts: int,
    next_try: datetime | None,
    throttled: bool,
) -> str:
    """One ``byok watch`` line for a package handed back for another delivery."""
    shown = name.encode("unicode_escape").decode("ascii")
    when = f", next try at {clock_time(next_try)}" if next_try else ""
    if throttled:
        return f"{clock_time(now)} {shown}: waiting: throttled by the HSM{when}"
    tries = f"attempt {attempt}/{max_attempts}" if attempt is not None else "not counted"
    return f"{clock_time(now)} {shown}: will retry ({tries}{when}): {message}"


def watch_summary(outcomes: Mapping[str, int], redeliveries: int, left: int) -> str:
    """The closing line of ``byok watch``."""
    total = sum(outcomes.values())
    parts = ", ".join(f"{n} {s}" for s, n in sorted(outcomes.items())) or "nothing"
    tail = f"; {left} still waiting in incoming" if left else ""
    return (
        f"delivered {total} package{'s' if total != 1 else ''}: {parts}; "
        f"{redeliveries} redeliver{'ies' if redeliveries != 1 else 'y'}{tail}"
    )
