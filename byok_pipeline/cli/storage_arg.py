"""``--storage``: which storage account a command uses, without a secret on the command line.

A command line is visible to every user of the machine (``ps``, ``/proc/PID/cmdline``) and
lands in shell history, so ``--storage`` never takes an account key or a SAS token. It takes:

- an account URL, ``https://ACCOUNT.blob.core.windows.net`` (identity auth: ``az login``, a
  managed identity), which sets ``BYOK_STORAGE__blobServiceUri`` for this process; or
- ``@FILE``: a file holding a connection string (readable by you alone, e.g. ``chmod 600``),
  which sets ``BYOK_STORAGE`` for this process.

Without ``--storage`` the environment decides (``BYOK_STORAGE`` or
``BYOK_STORAGE__blobServiceUri``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

_SECRET_MARKERS = ("accountkey=", "sharedaccesssignature=", "sig=")
_HOW = (
    "pass an account URL (https://ACCOUNT.blob.core.windows.net, with `az login`) or put the "
    "connection string in $BYOK_STORAGE or in a file and pass --storage @FILE"
)


@dataclass(frozen=True)
class StorageChoice:
    """Where ``--storage`` points; :meth:`apply` puts it into the process environment."""

    account_url: str | None = None
    connection_string: str | None = None

    def apply(self, env: dict[str, str] | os._Environ[str] | None = None) -> None:
        """Override the storage settings of ``env`` (the process environment by default)."""
        target = os.environ if env is None else env
        if self.account_url:
            target.pop("BYOK_STORAGE", None)
            target["BYOK_STORAGE__blobServiceUri"] = self.account_url
        elif self.connection_string:
            target["BYOK_STORAGE"] = self.connection_string


def storage_arg(text: str) -> StorageChoice:
    """argparse ``type`` for ``--storage``.

    Raises:
        argparse.ArgumentTypeError: a secret (account key, SAS) or anything else that is neither
            an https account URL nor ``@FILE`` with a connection string. The message never
            repeats the value.
    """
    if text.startswith("@"):
        return _from_file(Path(text[1:]))
    lowered = text.lower()
    if any(marker in lowered for marker in _SECRET_MARKERS):
        raise argparse.ArgumentTypeError(
            f"refusing a storage secret on the command line (other users can read it): {_HOW}"
        )
    parts = urlsplit(text) if "://" in text else None
    if parts is None or parts.scheme != "https" or not parts.hostname or parts.query:
        raise argparse.ArgumentTypeError(f"not an https account URL: {_HOW}")
    return StorageChoice(account_url=f"https://{parts.netloc}")


def _from_file(path: Path) -> StorageChoice:
    try:
        content = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise argparse.ArgumentTypeError(f"cannot read {path}: {why}") from None
    if not content or "\n" in content or "=" not in content:
        raise argparse.ArgumentTypeError(
            f"{path} does not hold one connection string (a single line of KEY=VALUE;...)"
        )
    return StorageChoice(connection_string=content)


def add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        type=storage_arg,
        metavar="URL|@FILE",
        help="storage account: https://ACCOUNT.blob.core.windows.net (identity auth) or @FILE "
        "holding a connection string; never a key on the command line "
        "(default: $BYOK_STORAGE or $BYOK_STORAGE__blobServiceUri)",
    )
