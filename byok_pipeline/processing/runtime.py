"""What the Function app's triggers call: deps built lazily once per process, outcomes mapped.

``function_app.py`` stays wiring only. Tests replace the deps factory with
:func:`set_deps_factory` (the Functions host cannot run here).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from byok_pipeline.core.errors import ConfigError, InProgress, Rejected, TransientError
from byok_pipeline.core.reasons import REASONS
from byok_pipeline.core.settings import Settings
from byok_pipeline.core.status import STATES

if TYPE_CHECKING:  # the processor (and the SDKs it pulls in) loads on the first package
    from byok_pipeline.core.dashboard import TrailStatus
    from byok_pipeline.processing.processor import Deps, Outcome

log = logging.getLogger("byok_pipeline")
_lock = threading.Lock()
_HEX64 = re.compile(r"[0-9a-f]{64}")
_deps: Deps | None = None
_factory: Callable[[], Deps] | None = None


def _default_factory() -> Deps:
    from byok_pipeline.processing.wiring import build_deps

    return build_deps(Settings.from_env())


def set_deps_factory(factory: Callable[[], Deps] | None) -> None:
    """Replace how deps are built (tests, local runner); ``None`` restores the default."""
    global _deps, _factory  # noqa: PLW0603  # one process-wide cache, by design
    with _lock:
        _factory = factory
        _deps = None


def get_deps() -> Deps:
    """Build the deps on first use (keeps cold start small), then reuse them."""
    global _deps  # noqa: PLW0603  # one process-wide cache, by design
    with _lock:
        if _deps is None:
            _deps = (_factory or _default_factory)()
        return _deps


#: Loggers whose INFO output is per-request noise (azure-core logs every HTTP request and
#: response at INFO): held at WARNING in the Function, where the host forwards every record.
QUIET_LOGGERS = (
    "azure",
    "azure.core.pipeline.policies.http_logging_policy",
    "azure.identity",
    "azure.monitor.opentelemetry",
    "urllib3",
)


def configure_logging() -> None:
    """Set the worker's log levels in code (host.json cannot: under the host, worker output is
    the ``Function.<name>.User`` category). The pipeline's own logger stays at INFO."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("byok_pipeline").setLevel(logging.INFO)


def handle_blob(name: str) -> Outcome:
    """Process one blob-trigger invocation for ``name`` in the incoming container.

    Raises:
        InProgress, TransientError: let the platform redeliver (the invocation fails).
    """
    deps = get_deps()
    try:
        from byok_pipeline.processing.processor import process_blob

        outcome = process_blob(name, deps)
    except (InProgress, TransientError) as exc:
        log.warning("byok: %s for %s; the platform will redeliver", exc.reason, name)
        raise
    doc = outcome.doc
    log.info(
        "byok: %s -> %s",
        name,
        outcome.state,
        extra={
            "correlation_id": doc.correlation_id if doc else None,
            "reason_code": outcome.reason_code,
        },
    )
    return outcome


def handle_approval(name: str) -> Outcome | None:
    """An approval or manifest was stored at ``<package sha256>/<file>`` in the approvals
    container: deliver the package again if it is awaiting approval (None: nothing to do; a
    package not dropped yet counts its approvals when it is).

    Raises:
        InProgress, TransientError: let the platform redeliver (the invocation fails).
    """
    sha = name.split("/", 1)[0]
    if not _HEX64.fullmatch(sha):
        log.warning("byok: ignoring %r in the approvals container (not <sha256>/<file>)", name)
        return None
    doc = get_deps().store.load_status(f"packages/{sha}.json")
    if doc is None or doc.state not in ("awaiting_approval", "received"):
        return None  # "received": its first delivery may be running; this one waits behind it
    return handle_blob(doc.blob_name)


def http_json(status: int, body: Any) -> tuple[int, bytes]:
    return status, json.dumps(body, indent=2, sort_keys=True).encode()


def list_packages(state: str | None) -> tuple[int, bytes]:
    """``GET /api/packages[?state=...]``: status summaries."""
    if state is not None and state not in STATES:
        return http_json(
            400, {"error": "bad_state", "message": f"state must be one of {list(STATES)}"}
        )
    try:
        docs = [d.summary() for d in get_deps().store.iter_statuses(state)]
    except (TransientError, ConfigError) as exc:
        return http_json(503, {"error": exc.reason, "message": exc.message})
    return http_json(200, {"packages": docs, "count": len(docs)})


def get_package(name: str) -> tuple[int, bytes]:
    """``GET /api/packages/{name}``: the latest status of the package dropped as ``name``."""
    try:
        doc = get_deps().store.status_by_blob_or_key_name(name)
    except (TransientError, ConfigError) as exc:
        return http_json(503, {"error": exc.reason, "message": exc.message})
    if doc is None:
        return http_json(404, {"error": "not_found", "message": f"no package named {name!r}"})
    body = doc.summary()
    if doc.reason_code:
        body["reason"] = REASONS.get(doc.reason_code)
    return http_json(200, body)


def get_kek() -> tuple[int, bytes]:
    """``GET /api/kek``: the configured KEK's kid, public PEM and SPKI SHA-256 (no secret), and
    its attestation as the HSM answered it (``attestation``; null with ``attestation_error``
    when the HSM gave none). Save ``attestation`` as JSON and verify it offline with
    ``byok-package verify-kek-attestation``."""
    from byok_pipeline.processing.kek_info import kek_attestation, kek_info
    from offline_packager.kid import parse_kid

    deps = get_deps()
    if not deps.settings.kek_kid:
        return http_json(404, {"error": "no_kek", "message": "BYOK_KEK_KID is not configured"})
    kid = parse_kid(deps.settings.kek_kid)
    try:
        info = kek_info(deps.hsm, kid, request_id="api-kek")
    except TransientError as exc:
        return http_json(503, {"error": exc.reason, "message": exc.message})
    except Exception as exc:  # noqa: BLE001  # any refusal maps to a 4xx with its reason
        return http_json(404, {"error": getattr(exc, "reason", "error"), "message": str(exc)})
    try:
        attestation = kek_attestation(deps.hsm, kid, request_id="api-kek")
    except (Rejected, TransientError) as exc:  # the KEK's facts are still worth answering
        info["attestation"] = None
        info["attestation_error"] = {"error": exc.reason, "message": exc.message}
    else:
        info["attestation"] = attestation["document"]
        info["attestation_sha256"] = attestation["sha256"]
    return http_json(200, info)


def dashboard(
    trail_check: Callable[[], TrailStatus] | None = None,
) -> tuple[int, bytes, dict[str, str]]:
    """``GET /api/dashboard`` (and ``byok serve``'s ``/``): the HTML dashboard with its
    Content-Security-Policy; a 503 page naming the reason when storage cannot be read.
    ``trail_check`` runs the audit trail verifier for the page (``byok serve``)."""
    from byok_pipeline.core.dashboard_page import headers, render_error
    from byok_pipeline.processing.dashboard import page

    try:
        html = page(get_deps(), trail_check=trail_check)
    except (TransientError, ConfigError) as exc:
        return 503, render_error(f"[{exc.reason}] {exc.message}").encode(), headers()
    return 200, html.encode(), headers()


def reconcile() -> dict[str, Any]:
    """Timer trigger: complete missing audit records, redeliver stale waiting packages."""
    from dataclasses import asdict

    from byok_pipeline.processing.reconcile import reconcile as run

    report = asdict(run(get_deps()))
    log.info("byok reconcile: %s", json.dumps(report, sort_keys=True))
    return report
