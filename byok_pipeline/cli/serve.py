"""``byok serve``: the dashboard and the Function app's HTTP routes on a local port.

The same settings as the Function (storage, ``BYOK_HSM_URL``, optional ``BYOK_KEK_KID``; ``byok
dev up`` writes them for a local stack) and the same code: each request is answered by
:mod:`byok_pipeline.processing.runtime`, as the Function's routes are. Read-only: it writes
nothing and records no audit event.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from byok_pipeline.core.dashboard import TrailStatus
from byok_pipeline.core.errors import ConfigError
from byok_pipeline.core.settings import Settings

EXIT_INTERRUPTED = 130
DEFAULT_PORT = 8080


class ReadOnlyAudit:
    """The audit sink of a server that changes nothing: any event is a programming error."""

    def emit(self, event: Mapping[str, Any]) -> None:
        raise ConfigError(f"byok serve records no audit events ({event.get('event')})")

    def emit_many(self, events: Sequence[Mapping[str, Any]]) -> None:
        for event in events:
            self.emit(event)


def add_serve_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """``byok serve [--port N] [--host ADDRESS] [--no-verify-trail]``."""
    sv = sub.add_parser(
        "serve",
        parents=[common],
        help="open the dashboard: serve it and the Function's HTTP routes on a local port",
        description="Serve the BYOK dashboard (/ and /api/dashboard) and the Function app's HTTP "
        "routes (/api/packages, /api/packages/NAME, /api/kek) from the same code the Function "
        "runs, reading the storage and HSM the environment names (as the Function does; "
        "`byok dev up` writes them for a local stack). Prints the URL; open it in a browser. "
        "Read-only. Ctrl-C stops it (exit 130).",
    )
    sv.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help=f"TCP port (default {DEFAULT_PORT}; 0: any free port, printed)",
    )
    sv.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; the server has no "
        "login, so anyone who reaches another address sees every package)",
    )
    sv.add_argument(
        "--no-verify-trail",
        dest="verify_trail",
        action="store_false",
        help="do not run the audit trail verifier for each dashboard view (it reads the whole "
        "trail; with BYOK_AUDIT_TRUST_FILE it also checks the signers are pinned)",
    )


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("a port is 0-65535")
    return value


def trail_check(settings: Settings, env: Mapping[str, str]) -> Any:
    """A callable running ``byok audit verify`` over the whole trail (the trust file of
    ``BYOK_AUDIT_TRUST_FILE`` when set; else signers are fetched from this HSM only)."""
    from byok_pipeline.audit.verify import TrailReader, Trust
    from byok_pipeline.cli.audit import hsm_key_fetcher
    from byok_pipeline.processing.dashboard import verify_trail
    from byok_pipeline.processing.wiring import blob_service

    def check() -> TrailStatus:
        trust_file = env.get("BYOK_AUDIT_TRUST_FILE")
        try:
            trust = Trust.load(trust_file) if trust_file else None
        except ConfigError as exc:
            return TrailStatus(ok=False, error=f"[{exc.reason}] {exc.message}")
        reader = TrailReader(
            blob_service(settings, env), settings.audit_container, settings.audit_people_container
        )
        fetch = hsm_key_fetcher(env, only_vault=None if trust else settings.hsm_url)
        return verify_trail(reader, trust=trust, fetch_key=fetch)

    return check


def cmd_serve(args: argparse.Namespace, *, settings: Settings, deps: Any) -> int:
    """Serve until Ctrl-C (exit 130).

    Raises:
        ServeError: the port is in use or the address cannot be bound (one line, exit 1).
    """
    from byok_pipeline.localdev.server import DashboardServer, is_loopback
    from byok_pipeline.processing import runtime

    check = trail_check(settings, dict(os.environ)) if args.verify_trail else None
    server = DashboardServer(args.host, args.port, trail_check=check)
    runtime.set_deps_factory(lambda: deps)
    try:
        if args.json:  # one line for a script that starts it: where to find it
            where = {"url": server.url, "api": f"{server.url}api/packages"}
            print(json.dumps(where), flush=True)
        else:
            print(
                f"byok serve: dashboard at {server.url}  (JSON: {server.url}api/packages)",
                flush=True,
            )
        if not is_loopback(args.host):
            print(
                f"byok serve: listening on {args.host}, not this machine only: the server has "
                "no login, anyone who reaches it sees every package",
                file=sys.stderr,
                flush=True,
            )
        print("byok serve: Ctrl-C to stop", file=sys.stderr, flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("byok serve: stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        server.server_close()
        runtime.set_deps_factory(None)
    return 0
