"""``python -m managed_hsm_emulator --data-dir DIR [--host 127.0.0.1] [--port 0]``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from .app import Emulator, EmulatorConfig, load_fault_rules
from .errors import StartupError
from .limits import DEFAULT_MAX_KEYS, DEFAULT_MAX_VERSIONS_PER_KEY, PROFILES, LimitsConfig
from .service import DEFAULT_RETENTION_DAYS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m managed_hsm_emulator",
        description="Local Managed HSM keys service with real BYOK import (a development "
        "tool, not an HSM).",
    )
    p.add_argument("--data-dir", required=True, type=Path, help="state, certificates, keys")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument(
        "--port",
        default=0,
        type=int,
        help="port to bind. Default 0: the port kept in DIR/identity.json (any free port on the "
        "first start); an explicit port replaces the kept one",
    )
    p.add_argument(
        "--faults",
        help="fault rules: inline JSON (a rule or a list of rules) or a JSON file path",
    )
    p.add_argument("--fault-seed", type=int, help="seed for rate-based faults")
    p.add_argument(
        "--retention-days",
        type=int,
        default=DEFAULT_RETENTION_DAYS,
        choices=range(7, 91),
        metavar="7-90",
        help=f"soft-delete retention (default {DEFAULT_RETENTION_DAYS})",
    )
    p.add_argument(
        "--limits",
        choices=PROFILES,
        help="service-limits mode: Managed HSM's published rate limits per partition (429 with "
        "Retry-After) and object limits (default: off)",
    )
    p.add_argument(
        "--limits-scale",
        type=float,
        metavar="N",
        help="with --limits: multiply every rate by N (default 1; e.g. 10 admits 10 creates or "
        "imports per second per partition)",
    )
    p.add_argument(
        "--max-keys",
        type=int,
        metavar="N",
        help=f"with --limits: keys per HSM (default {DEFAULT_MAX_KEYS})",
    )
    p.add_argument(
        "--max-versions-per-key",
        type=int,
        metavar="N",
        help=f"with --limits: versions per key (default {DEFAULT_MAX_VERSIONS_PER_KEY})",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run until SIGTERM/SIGINT. Returns 0 after a clean stop, 2 if it cannot start."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # handlers first: a stop asked for while starting (e.g. right after endpoint.json appears)
    # is honoured once the start is done, instead of killing the process half-way
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001  # signal API
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        rules = load_fault_rules(args.faults) if args.faults else []
        limits = LimitsConfig.from_options(
            args.limits,
            scale=args.limits_scale,
            max_keys=args.max_keys,
            max_versions_per_key=args.max_versions_per_key,
        )
        emulator = Emulator.start(
            EmulatorConfig(
                data_dir=args.data_dir,
                host=args.host,
                port=args.port,
                faults=rules,
                fault_seed=args.fault_seed,
                retention_days=args.retention_days,
                limits=limits,
            )
        )
    except StartupError as exc:
        print(f"managed_hsm_emulator: cannot start ({exc.reason}): {exc}", file=sys.stderr)
        return 2
    emulator.serve_in_thread()
    print(emulator.url, flush=True)
    stop.wait()
    emulator.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
