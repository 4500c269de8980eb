"""The request log: what reached the emulator, never what it carried.

Each Key Vault request (challenges and refusals included; admin requests excluded) becomes
one entry: sequence number, time, method, path, api-version, operation, status, error reason,
the client's ``x-ms-client-request-id``, the emulator's ``x-ms-request-id``, the fault applied
and the duration. Never bodies, tokens or other headers. Entries go to an in-memory ring
(read through ``GET /_admin/requests``) and, as JSON lines, to ``DIR/requests.jsonl``.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import threading
from pathlib import Path
from typing import IO, Any

DEFAULT_CAPACITY = 10_000
MAX_HEADER_CHARS = 256


def clean_header(value: str | None) -> str | None:
    """A header value fit for the log: printable ASCII, at most 256 characters."""
    if value is None:
        return None
    return "".join(c for c in value[:MAX_HEADER_CHARS] if 32 <= ord(c) < 127)  # printable ASCII


class RequestLog:
    """Append-only request log: ring buffer plus optional JSON-lines file."""

    def __init__(self, path: Path | None, *, capacity: int = DEFAULT_CAPACITY) -> None:
        self._ring: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._seq = 0
        self._file: IO[str] | None = path.open("a", encoding="utf-8") if path else None

    def record(self, **fields: Any) -> dict[str, Any]:
        """Add an entry; ``seq`` and ``time`` are filled in."""
        with self._lock:
            self._seq += 1
            entry = {
                "seq": self._seq,
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                **fields,
            }
            self._ring.append(entry)
            if self._file is not None:
                self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")
                self._file.flush()
            return entry

    def since(self, seq: int = 0) -> list[dict[str, Any]]:
        """Entries with a sequence number above ``seq``, oldest first."""
        with self._lock:
            return [dict(e) for e in self._ring if e["seq"] > seq]

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._seq

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
