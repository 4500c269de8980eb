"""Run the emulator for tests, demos and benchmarks.

::

    from managed_hsm_emulator.testing import running_emulator

    with running_emulator(tmp_path / "hsm") as hsm:
        client = hsm.key_client()                     # azure.keyvault.keys.KeyClient
        kek = client.create_rsa_key("kek", size=3072, key_operations=["import"])
        hsm.inject_fault("429", method="GET", path="/keys/*", count=1)
        seen = hsm.requests_seen()                    # request log entries (no bodies)

    # Managed HSM's published limits, 10 times faster: 10 imports/s per partition
    with running_emulator(tmp_path / "hsm", limits="managed-hsm", limits_scale=10) as hsm:
        print(hsm.limits()["throttled"])              # 429s per operation so far

:func:`running_emulator` starts ``python -m managed_hsm_emulator --data-dir DIR --port 0`` as a
subprocess (stdout/stderr to ``DIR/emulator.log``), waits for ``DIR/endpoint.json`` (raising
:class:`EmulatorStartError` after ``startup_timeout`` seconds instead of hanging) and stops it
with SIGTERM on exit. Starting again on the same ``DIR`` finds the same keys on the same port
(kept in ``DIR/identity.json``), so kids and the BYOK packages built for its KEKs stay valid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .credential import EmulatorCredential
from .tls import client_context

if TYPE_CHECKING:
    from azure.keyvault.keys import KeyClient
    from azure.keyvault.keys.crypto import CryptographyClient

_PROJECT_ROOT = Path(__file__).resolve().parent.parent
_LOG_TAIL = 2000


class EmulatorStartError(RuntimeError):
    """The emulator process exited or did not become ready in time; carries its log tail."""


@dataclass(frozen=True)
class RawResponse:
    """Status, headers (lower-case names) and parsed JSON body (None if empty)."""

    status: int
    headers: Mapping[str, str]
    body: Any


@dataclass
class EmulatorHandle:
    """A running emulator: where it is and how to talk to it."""

    url: str
    ca: Path
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    _stopped: bool = field(default=False, repr=False)

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the host part of the ``kid`` of every key read through
        :attr:`url` (``localhost:PORT`` and ``[::1]:PORT`` name the same emulator)."""
        return self.url.removeprefix("https://")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    # --- SDK clients ------------------------------------------------------------------------

    def credential(self, **kwargs: Any) -> EmulatorCredential:
        """An :class:`EmulatorCredential` for this data directory (kwargs: ``lifetime_seconds``,
        ``clock``)."""
        return EmulatorCredential(self.data_dir, **kwargs)

    def client_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every SDK client needs for this emulator."""
        return {"verify_challenge_resource": False, "connection_verify": str(self.ca)}

    def key_client(self, credential: Any = None, **kwargs: Any) -> KeyClient:
        """An ``azure.keyvault.keys.KeyClient`` for this emulator; kwargs go to the client
        (e.g. ``api_version``, ``retry_total``, ``retry_backoff_factor``)."""
        from azure.keyvault.keys import KeyClient

        return KeyClient(
            self.url, credential or self.credential(), **{**self.client_kwargs(), **kwargs}
        )

    def crypto_client(self, key: Any, credential: Any = None, **kwargs: Any) -> CryptographyClient:
        """A ``CryptographyClient`` for a ``KeyVaultKey`` or key id served by this emulator."""
        from azure.keyvault.keys.crypto import CryptographyClient

        return CryptographyClient(
            key, credential or self.credential(), **{**self.client_kwargs(), **kwargs}
        )

    # --- raw HTTP -----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        authenticated: bool = True,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> RawResponse:
        """Send one HTTPS request (``path`` may include a query). By default it carries a
        valid token; ``token=`` overrides it and ``authenticated=False`` sends none."""
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if token is None and authenticated:
            from .tokens import SCOPE

            token = self.credential().get_token(SCOPE).token
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)  # noqa: S310  # https URL built from our own endpoint
        ctx = client_context(str(self.ca))
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:  # noqa: S310  # same
                return _raw(resp.status, resp.headers.items(), resp.read())
        except urllib.error.HTTPError as err:
            with err:
                return _raw(err.code, err.headers.items(), err.read())

    # --- admin: request log and faults ----------------------------------------------------------

    def _admin(self, method: str, path: str, body: Any = None) -> Any:
        resp = self.request(method, f"/_admin/{path}", body, authenticated=False)
        if resp.status >= 400:  # HTTP error statuses
            raise RuntimeError(f"admin {method} {path} failed: {resp.status} {resp.body}")
        return resp.body

    def requests_seen(self, since: int = 0) -> list[dict[str, Any]]:
        """Request log entries after sequence number ``since``: ``seq``, ``time``, ``method``,
        ``path``, ``api_version``, ``operation``, ``status`` (what the client got; None:
        dropped), ``reason``, ``client_request_id``, ``request_id``, ``fault``, ``fault_phase``,
        ``operation_status`` (with a phase-``after`` fault: what the operation itself answered),
        ``body_bytes`` (request body length; None if its framing was refused), ``duration_ms``."""
        body = self._admin("GET", f"requests?since={since}")
        return list(body["value"])

    def last_request_seq(self) -> int:
        """The sequence number of the latest logged request (use as ``since`` later)."""
        return int(self._admin("GET", "health")["last_request_seq"])

    def inject_fault(
        self,
        kind: str,
        *,
        method: str = "*",
        path: str = "*",
        count: int | None = None,
        rate: float | None = None,
        retry_after: int | None = None,
        delay: float | None = None,
        phase: str | None = None,
    ) -> dict[str, Any]:
        """Add a fault rule (see :mod:`managed_hsm_emulator.faults`); returns it with its ``id``.

        ``kind``: ``"429"``, ``"503"``, ``"drop"`` or ``"delay"``. ``phase``: ``"before"`` (the
        default: instead of the operation) or ``"after"`` (the operation runs and commits, then
        its reply is lost, replaced or delayed).
        """
        optional = {
            "count": count,
            "rate": rate,
            "retry_after": retry_after,
            "delay": delay,
            "phase": phase,
        }
        rule: dict[str, Any] = {"kind": kind, "method": method, "path": path}
        rule.update({name: value for name, value in optional.items() if value is not None})
        return dict(self._admin("POST", "faults", rule))

    def faults(self) -> list[dict[str, Any]]:
        """Current rules with their ``matched`` and ``fired`` counters."""
        return list(self._admin("GET", "faults")["value"])

    def remove_fault(self, rule_id: int) -> None:
        self._admin("DELETE", f"faults/{rule_id}")

    def clear_faults(self) -> None:
        self._admin("DELETE", "faults")

    # --- admin: service-limits mode ---------------------------------------------------------------

    def limits(self) -> dict[str, Any]:
        """The service-limits mode: ``{"enabled": False}`` when off; else its configuration,
        ``rates`` (per partition per second, scaled), ``admitted``/``throttled`` per operation,
        ``throttled_by_partition``, ``refused`` (``hsm_key_limit``, ``key_version_limit``) and
        ``keys`` (held, soft-deleted included)."""
        return dict(self._admin("GET", "limits"))

    def reset_limits(self) -> None:
        """Refill every rate bucket and zero the counters of the service-limits mode."""
        self._admin("POST", "limits/reset")

    # --- lifecycle ------------------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout`` seconds (then SIGKILL); returns the exit code."""
        if not self._stopped:
            self._stopped = True
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout)
        return int(self.process.returncode)

    def log_text(self) -> str:
        """Everything the emulator wrote to stdout/stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def _raw(status: int, headers: Any, data: bytes) -> RawResponse:
    body = json.loads(data) if data else None
    return RawResponse(status, {k.lower(): v for k, v in headers}, body)


def _limits_args(
    limits: str | None,
    limits_scale: float,
    max_keys: int | None,
    max_versions_per_key: int | None,
) -> list[str]:
    """Command-line options of the service-limits mode (the emulator refuses them without
    ``--limits``)."""
    args = [] if limits is None else ["--limits", limits]
    if limits_scale != 1.0:
        args += ["--limits-scale", repr(float(limits_scale))]
    if max_keys is not None:
        args += ["--max-keys", str(max_keys)]
    if max_versions_per_key is not None:
        args += ["--max-versions-per-key", str(max_versions_per_key)]
    return args


def start_emulator(
    data_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: Sequence[Mapping[str, Any]] | None = None,
    limits: str | None = None,
    limits_scale: float = 1.0,
    max_keys: int | None = None,
    max_versions_per_key: int | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 30.0,
    python: str = sys.executable,
) -> EmulatorHandle:
    """Start an emulator subprocess and wait until it serves. Call :meth:`EmulatorHandle.stop`.

    ``limits="managed-hsm"`` turns the service-limits mode on, ``limits_scale`` multiplies its
    rates, ``max_keys``/``max_versions_per_key`` replace its object limits (see
    :mod:`managed_hsm_emulator.limits`).

    Raises:
        EmulatorStartError: it exited early or did not write ``endpoint.json`` in time.
    """
    root = Path(data_dir).resolve()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    endpoint = root / "endpoint.json"
    endpoint.unlink(missing_ok=True)
    log_path = root / "emulator.log"
    args = [python, "-m", "managed_hsm_emulator", "--data-dir", str(root)]
    args += ["--host", host, "--port", str(port)]
    args += _limits_args(limits, limits_scale, max_keys, max_versions_per_key)
    args += extra_args
    if faults:
        args += ["--faults", json.dumps(list(faults))]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    with log_path.open("ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=log, env=env)
    deadline = time.monotonic() + startup_timeout
    while True:
        if endpoint.exists():
            with contextlib.suppress(ValueError, OSError):
                info = json.loads(endpoint.read_text(encoding="utf-8"))
                if info.get("pid") == process.pid:
                    return EmulatorHandle(
                        url=str(info["url"]),
                        ca=Path(info["ca"]),
                        data_dir=root,
                        process=process,
                        log_path=log_path,
                    )
        if process.poll() is not None or time.monotonic() > deadline:
            why = (
                f"exited with code {process.returncode}"
                if process.poll() is not None
                else f"not ready after {startup_timeout:g} s"
            )
            if process.poll() is None:
                process.kill()
                process.wait(5)
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-_LOG_TAIL:]
            raise EmulatorStartError(f"the emulator {why}; log tail:\n{tail}")
        time.sleep(0.02)


@contextlib.contextmanager
def running_emulator(
    data_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: Sequence[Mapping[str, Any]] | None = None,
    limits: str | None = None,
    limits_scale: float = 1.0,
    max_keys: int | None = None,
    max_versions_per_key: int | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 30.0,
) -> Iterator[EmulatorHandle]:
    """Context manager: :func:`start_emulator` on entry, :meth:`EmulatorHandle.stop` on exit.

    Raises:
        EmulatorStartError: see :func:`start_emulator`.
    """
    handle = start_emulator(
        data_dir,
        host=host,
        port=port,
        faults=faults,
        limits=limits,
        limits_scale=limits_scale,
        max_keys=max_keys,
        max_versions_per_key=max_versions_per_key,
        extra_args=extra_args,
        startup_timeout=startup_timeout,
    )
    try:
        yield handle
    finally:
        handle.stop()
