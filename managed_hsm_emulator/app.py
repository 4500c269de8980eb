"""Assemble and run an emulator: data directory, TLS, store, service, server, endpoint file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

from offline_packager.secret import SecretBytes

from .attestation import AttestationAuthority
from .datadir import DataDir, atomic_write, load_or_create_secret
from .errors import EmulatorError, StartupError
from .faults import FaultInjector
from .http_server import EmulatorHTTPServer
from .identity import WILDCARD_HOSTS, host_for_authority, load_port, save_port
from .limits import LimitsConfig, ServiceLimits
from .requestlog import RequestLog
from .sealing import MASTER_KEY_BYTES, Sealer
from .service import DEFAULT_RETENTION_DAYS, KeyVaultService
from .store import KeyStore
from .tls import ensure_certificates, server_context
from .tokens import TOKEN_KEY_BYTES

LOG = logging.getLogger("managed_hsm_emulator")


@dataclass(frozen=True)
class EmulatorConfig:
    """Start options (see ``python -m managed_hsm_emulator --help``)."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    faults: Sequence[Any] = ()
    fault_seed: int | None = None
    retention_days: int = DEFAULT_RETENTION_DAYS
    limits: LimitsConfig | None = None  # the service-limits mode (None: off)
    clock: Callable[[], float] = field(default=time.time, compare=False)


def load_fault_rules(text: str) -> list[Any]:
    """Fault rules from ``--faults``: inline JSON (a rule or a list) or a path to a JSON file.

    Raises:
        StartupError: reason ``bad_fault_rule``.
    """
    stripped = text.strip()
    try:
        if stripped.startswith(("[", "{")):
            doc = json.loads(stripped)
        else:
            doc = json.loads(Path(stripped).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StartupError(
            f"--faults is neither inline JSON nor a readable JSON file ({type(exc).__name__})",
            reason="bad_fault_rule",
        ) from None
    return doc if isinstance(doc, list) else [doc]


class Emulator:
    """A running emulator. Use :meth:`start`, then :meth:`serve_forever` or a thread, then
    :meth:`close`. Also usable in-process in tests (``with Emulator.start(cfg) as emu``)."""

    def __init__(
        self,
        config: EmulatorConfig,
        paths: DataDir,
        server: EmulatorHTTPServer,
        store: KeyStore,
        lock_file: IO[bytes],
    ) -> None:
        self.config = config
        self.paths = paths
        self.server = server
        self.store = store
        self._lock_file = lock_file
        self._thread: threading.Thread | None = None
        identity = server.identity
        # the wildcard is not an address to connect to: show the loopback address of its family
        if identity.bound_host in WILDCARD_HOSTS:
            shown = "[::1]" if identity.bound_host == "::" else "127.0.0.1"
        else:
            shown = host_for_authority(identity.bound_host)
        self.url = f"https://{shown}:{identity.port}"

    @classmethod
    def start(cls, config: EmulatorConfig) -> Self:
        """Prepare DIR, bind the port and write ``endpoint.json``. Serving starts with
        :meth:`serve_forever` or :meth:`serve_in_thread`.

        Raises:
            StartupError: bad data directory, another emulator on it, bad faults, port in use.
        """
        paths = DataDir(config.data_dir.resolve())
        paths.create()
        lock_file = paths.lock.open("ab")
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            raise StartupError(
                f"another emulator is serving {paths.root}", reason="data_dir_in_use"
            ) from None
        try:
            return cls._start_locked(config, paths, lock_file)
        except BaseException:
            lock_file.close()
            raise

    @classmethod
    def _start_locked(cls, config: EmulatorConfig, paths: DataDir, lock_file: IO[bytes]) -> Self:
        paths.endpoint.unlink(missing_ok=True)
        ensure_certificates(paths)
        token_key = SecretBytes(
            load_or_create_secret(paths.token_key, TOKEN_KEY_BYTES), label="token key"
        )
        master = SecretBytes(
            load_or_create_secret(paths.master_key, MASTER_KEY_BYTES), label="master key"
        )
        store = KeyStore(paths, Sealer(master))
        store.load()
        faults = FaultInjector(seed=config.fault_seed)
        for rule in config.faults:
            try:
                faults.add(rule)
            except EmulatorError as exc:
                raise StartupError(exc.message, reason=exc.reason) from None
        try:
            attestation = AttestationAuthority.ensure(paths)
        except OSError as exc:
            raise StartupError(
                f"cannot write the attestation TEST PKI in {paths.root}: {exc.strerror}",
                reason="data_dir",
            ) from None
        service = KeyVaultService(
            store,
            clock=config.clock,
            retention_days=config.retention_days,
            attestation=attestation,
            limits=None if config.limits is None else ServiceLimits(config.limits),
        )
        persisted = load_port(paths)
        port = config.port or persisted or 0
        try:
            server = EmulatorHTTPServer(
                (config.host, port),
                service=service,
                token_key=token_key,
                faults=faults,
                request_log=RequestLog(paths.request_log),
                ssl_context=server_context(paths),
                clock=config.clock,
            )
        except OSError as exc:
            if config.port == 0 and persisted is not None:
                raise StartupError(
                    f"cannot listen on {config.host}:{port} ({exc.strerror}). The emulator of "
                    f"this data directory serves on port {port} and keeps it "
                    f"({paths.identity.name}) so that its kids, and the BYOK packages built for "
                    "its KEKs, stay valid. Free the port, or start with --port N to move the "
                    "emulator for good (kids then change: download the KEKs again and rebuild "
                    "their packages)",
                    reason="port_in_use",
                ) from None
            raise StartupError(
                f"cannot listen on {config.host}:{port}: {exc.strerror}", reason="bind"
            ) from None
        bound = server.identity.port
        if bound != persisted:
            try:
                save_port(paths, bound)
            except OSError as exc:
                server.server_close()
                raise StartupError(
                    f"cannot write {paths.identity.name}: {exc.strerror}", reason="data_dir"
                ) from None
            if persisted is not None:
                LOG.warning(
                    "moved from port %d to %d (--port): kids now carry the new port; packages "
                    "built for KEKs under the old one will be refused",
                    persisted,
                    bound,
                )
        emulator = cls(config, paths, server, store, lock_file)
        atomic_write(
            paths.endpoint,
            json.dumps({"url": emulator.url, "ca": str(paths.ca_pem), "pid": os.getpid()}).encode(),
            mode=0o644,
        )
        LOG.info(
            "serving %s (data dir %s, %d keys)",
            emulator.url,
            paths.root,
            len(list(store.records())),
        )
        if config.limits is not None:
            LOG.info(
                "service limits: %s x%g (%d keys, %d versions per key)",
                config.limits.profile,
                config.limits.scale,
                config.limits.max_keys,
                config.limits.max_versions_per_key,
            )
        return emulator

    def serve_forever(self) -> None:
        """Serve until :meth:`close` is called from another thread."""
        self.server.serve_forever(poll_interval=0.2)

    def serve_in_thread(self) -> None:
        """Serve from a daemon thread (in-process use)."""
        self._thread = threading.Thread(target=self.serve_forever, name="emulator", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting requests, wait for a change in progress, remove ``endpoint.json``."""
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self.store.lock:  # a write in flight finishes before we go
            self.paths.endpoint.unlink(missing_ok=True)
        self.server.request_log.close()
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
        self._lock_file.close()
        LOG.info("stopped")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
