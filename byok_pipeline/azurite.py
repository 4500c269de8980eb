"""Start and stop Azurite (blob service) on a free loopback port. Local runner and tests only."""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from .errors import ConfigError

# Azurite's well-known development account (public, documented by Microsoft; not a secret).
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # Azurite's published dev key
_LISTENING = re.compile(rb"listens on (http://127\.0\.0\.1:(\d+))")
REPO = Path(__file__).resolve().parent.parent


def azurite_binary() -> Path:
    """``node_modules/.bin/azurite-blob`` of this repository (``npm install`` puts it there).

    Raises:
        ConfigError: not installed.
    """
    local = REPO / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return local
    found = shutil.which("azurite-blob")
    if found:
        return Path(found)
    raise ConfigError("Azurite is not installed: run `make deps` (npm install)")


@dataclass
class Azurite:
    """A running Azurite blob service. Use as a context manager, or call :meth:`stop`."""

    process: subprocess.Popen[bytes]
    blob_url: str
    location: Path

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
            f"BlobEndpoint={self.blob_url}/{DEV_ACCOUNT};"
        )

    @classmethod
    def start(cls, location: Path, *, timeout: float = 30.0) -> Azurite:
        """Start on 127.0.0.1 with a free port; wait until it listens.

        Raises:
            ConfigError: Azurite is missing, exits, or does not listen within ``timeout``.
        """
        location.mkdir(parents=True, exist_ok=True)
        args = [str(azurite_binary()), "--blobHost", "127.0.0.1", "--blobPort", "0",
                "--location", str(location), "--skipApiVersionCheck", "--disableTelemetry",
                "--silent"]  # fmt: skip
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        assert proc.stdout is not None  # noqa: S101  # stdout=PIPE
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        buf = b""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not sel.select(timeout=0.2):
                    if proc.poll() is not None:
                        break
                    continue
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                match = _LISTENING.search(buf)
                if match:
                    # keep draining output in the background so Azurite never blocks on a pipe
                    _drain(proc)
                    return cls(proc, match[1].decode(), location)
        finally:
            sel.close()
        cls._kill(proc)
        raise ConfigError(f"Azurite did not start: {buf.decode(errors='replace')[-500:]}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        self._kill(self.process)

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _drain(proc: subprocess.Popen[bytes]) -> None:
    import threading

    def run() -> None:
        assert proc.stdout is not None  # noqa: S101  # stdout=PIPE
        with contextlib.suppress(OSError, ValueError):
            while proc.stdout.read(4096):
                pass

    threading.Thread(target=run, daemon=True, name="azurite-drain").start()
