"""A wrapper for secret bytes that refuses to be printed, logged or pickled.

Python cannot guarantee that secret bytes are erased from memory (immutable ``bytes`` copies
may exist); :meth:`SecretBytes.wipe` zeroes the wrapper's own buffer as a best effort.
"""

from __future__ import annotations

import hmac
from typing import NoReturn, Self


class SecretBytes:
    """Holds key material. ``repr``/``str``/``format`` are redacted; pickling is refused."""

    __slots__ = ("_buf", "_label")

    def __init__(self, data: bytes | bytearray, *, label: str = "secret") -> None:
        self._buf = bytearray(data)
        self._label = label

    def reveal(self) -> bytes:
        """Return the secret bytes. Call only where the secret is consumed by crypto."""
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def __repr__(self) -> str:
        return f"<SecretBytes {self._label}: {len(self._buf)} bytes, redacted>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretBytes):
            return NotImplemented
        return hmac.compare_digest(self._buf, other._buf)

    def __hash__(self) -> int:
        raise TypeError("SecretBytes is not hashable")

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretBytes cannot be pickled or copied out of process")

    def wipe(self) -> None:
        """Overwrite the buffer with zeros (best effort) and empty it."""
        for i in range(len(self._buf)):
            self._buf[i] = 0
        self._buf = bytearray()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()
