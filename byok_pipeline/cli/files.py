"""Reading the files a person names on the command line: one reason per way it can fail, and
never a plaintext key sent anywhere (:mod:`offline_packager.plaintext`)."""

from __future__ import annotations

import errno
from pathlib import Path

from byok_pipeline.core.errors import Rejected
from offline_packager.errors import ByokError
from offline_packager.plaintext import refuse_plaintext_key


def read_local(path: str | Path, *, what: str, limit: int, too_large: str = "too_large") -> bytes:
    """The bytes of ``path`` (a package, manifest, approval or policy file), refused when it
    holds plaintext key material.

    Raises:
        Rejected: ``file_not_found``, ``unreadable_input``, ``too_large`` (or the given
            reason) over ``limit`` bytes, ``plaintext_key``. Messages never quote the content.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > limit:
            raise Rejected(too_large, f"{what} {p} is {size} bytes, over the {limit}-byte limit")
        data = p.read_bytes()
    except OSError as exc:
        reason = "file_not_found" if exc.errno == errno.ENOENT else "unreadable_input"
        raise Rejected(reason, f"cannot read {what} {p}: {exc.strerror}") from None
    try:
        refuse_plaintext_key(data, str(p), advice="nothing was sent")
    except ByokError as exc:
        raise Rejected(exc.reason, exc.message) from None
    return data
