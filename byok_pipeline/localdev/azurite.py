"""Start and stop Azurite (blob service) on a free loopback port. Local runner and tests only."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from byok_pipeline.core.errors import ConfigError

# Azurite's well-known development account (public, documented by Microsoft; not a secret).
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # Azurite's published dev key
_LISTENING = re.compile(rb"listens on (http://127\.0\.0\.1:(\d+))")
REPO = Path(__file__).resolve().parents[2]


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
        """Start on 127.0.0.1 with a free port (output to ``location/azurite.log``); wait
        until it listens. The process outlives this one unless stopped (``byok dev up``).

        Raises:
            ConfigError: Azurite is missing, exits, or does not listen within ``timeout``.
        """
        location.mkdir(parents=True, exist_ok=True)
        log_path = location / "azurite.log"
        args = [
            str(azurite_binary()),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            "0",
            "--location",
            str(location),
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--silent",
        ]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            match = _LISTENING.search(log_path.read_bytes())
            if match:
                return cls(proc, match[1].decode(), location)
            time.sleep(0.05)
        stop_process_group(proc.pid)
        tail = log_path.read_bytes().decode(errors="replace")[-500:]
        raise ConfigError(f"Azurite did not start: {tail}")

    def stop(self) -> None:
        """SIGTERM to its process group, then SIGKILL after 10 s."""
        stop_process_group(self.process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def stop_process_group(pid: int, *, timeout: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid``; SIGKILL it if still alive after ``timeout``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
