"""How every ``byok`` command ends: one exit code, one line on stderr, never a traceback.

- 0 ok; 1 failed: a service unreachable, a login needed, a setting missing, a transient error
  (``byok: failed [REASON]: what happened: what to do``); 2 refused
  (``byok: refused [REASON]: ...``) or a usage error (``byok: usage error: ...``, with a
  suggestion for a mistyped command or option); 130 interrupted (Ctrl-C); 141 the output's
  reader went away (``byok reasons | head -1``).
- With ``--json`` on the command line, stdout also carries the error as one JSON object,
  ``{"status", "reason", "message"}``, usage errors included.
- ``--verbose`` adds the causes below the line (e.g. why each credential of the Azure chain
  failed); the Azure SDK's own log lines are never shown.

The CLI's SDK clients (:func:`cli_clients`) connect with a short timeout, retry a failed
connection once, and name the endpoint they could not reach with the fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from byok_pipeline.core.errors import PipelineError, Rejected
from byok_pipeline.core.settings import Settings
from offline_packager.cli_exit import (
    EXIT_FAILED,
    EXIT_REFUSED,
    UsageError,
    detach_stdout,
    ending,
    one_line,
    usage_error,
)
from offline_packager.errors import ByokError

TOOL = "byok"
_LOCAL_STACK = "start the local stack (`byok dev up`, then `source .byok-dev/env`)"


def cli_clients(settings: Settings) -> Any:
    """The :class:`~byok_pipeline.processing.wiring.ClientProfile` of a person's command: a
    connect timeout of BYOK_CLI_CONNECT_TIMEOUT_SECONDS, one retry of a failed connection, at
    most 2 retries of a call, storage backoffs of about a second, and each unreachable
    endpoint named with its fix."""
    from byok_pipeline.adapters.endpoints import HSM_UNREACHABLE, STORAGE_UNREACHABLE, EndpointHelp
    from byok_pipeline.processing.wiring import ClientProfile

    slow = "raise BYOK_CLI_CONNECT_TIMEOUT_SECONDS on a slow link"
    return ClientProfile(
        connection_timeout=settings.cli_connect_timeout,
        retry_total=2,
        retry_connect=1,
        storage_backoff=(0.2, 1.0, 0.2),  # about 1.2 s before each retry
        hsm_help=EndpointHelp(
            service="the HSM",
            reason=HSM_UNREACHABLE,
            local_fix=f"{_LOCAL_STACK}, or set BYOK_HSM_URL (--hsm-url) to your HSM",
            remote_fix="check BYOK_HSM_URL (--hsm-url) and the network path to the HSM "
            f"(DNS, firewall, private endpoint); {slow}",
            tls_fix="set BYOK_HSM_CA_BUNDLE to the CA of its certificate (the local stack's "
            "env file sets it)",
        ),
        storage_help=EndpointHelp(
            service="storage",
            reason=STORAGE_UNREACHABLE,
            local_fix=f"{_LOCAL_STACK}, or set BYOK_STORAGE (--storage) to your account",
            remote_fix="check BYOK_STORAGE or BYOK_STORAGE__blobServiceUri (--storage) and the "
            f"network path to the account (DNS, firewall, private endpoint); {slow}",
            tls_fix="its TLS certificate is not trusted: check the account URL, or a proxy "
            "that inspects TLS",
        ),
    )


def run(
    argv: Sequence[str] | None,
    build_parser: Callable[[], argparse.ArgumentParser],
    dispatch: Callable[[argparse.Namespace], int],
) -> int:
    """Parse ``argv`` and run the command; every ending becomes an exit code and at most one
    line on stderr (plus the causes with ``--verbose``). Never raises, except SystemExit from
    ``--help`` and ``--version``."""
    words = list(sys.argv[1:] if argv is None else argv)
    as_json, verbose = "--json" in words, "--verbose" in words

    def command() -> int:
        try:
            args = build_parser().parse_args(words)
        except UsageError as exc:
            return _usage(exc, as_json=as_json)
        for name in ("azure", "urllib3", "opentelemetry"):  # their logs are not for people
            logging.getLogger(name).setLevel(logging.CRITICAL)
        try:
            return dispatch(args)
        except BrokenPipeError:  # the reader went away: ended by ``ending`` (141)
            raise
        except Exception as exc:  # noqa: BLE001  # no traceback ever reaches a user: one line
            code, word, reason, message = classify(exc)
            if reason == "login_required" and not verbose:
                message += "; --verbose shows why each credential failed"
            report(word, reason, message, as_json=as_json)
            if verbose:
                _causes(exc)
            return code

    return ending(TOOL, "stopped; every command is safe to run again", command)


def classify(exc: Exception) -> tuple[int, str, str, str]:
    """Exit code, ``refused``/``failed``, reason code and message for an error."""
    if isinstance(exc, Rejected):
        return EXIT_REFUSED, "refused", exc.reason, exc.message
    if isinstance(exc, PipelineError):  # transient, config, in progress: a retry or a fix helps
        return EXIT_FAILED, "failed", exc.reason, exc.message
    if isinstance(exc, ByokError):  # the packager's checks (a kid, a file): refusals
        return EXIT_REFUSED, "refused", exc.reason, exc.message
    from azure.core.exceptions import AzureError, HttpResponseError

    from byok_pipeline.adapters.transient import as_transient

    if isinstance(exc, AzureError):
        transient = as_transient(exc, "the request failed")
        if transient is not None:
            return EXIT_FAILED, "failed", transient.reason, transient.message
        if isinstance(exc, HttpResponseError):
            code = getattr(exc.error, "code", None) if exc.error is not None else None
            what = f"the service answered {exc.status_code} {code or ''}".strip()
            return EXIT_FAILED, "failed", "service_error", f"{what}: check the role assignments"
        return EXIT_FAILED, "failed", "service_error", f"{type(exc).__name__}: {exc.message}"
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return EXIT_FAILED, "failed", "os_error", f"{exc.strerror or exc}{where}"
    bug = f"unexpected {type(exc).__name__}; please report it with the command you ran"
    return EXIT_FAILED, "failed", "internal_error", f"{bug} (--verbose shows the cause)"


def report(word: str, reason: str, message: str, *, as_json: bool) -> None:
    """The one error line on stderr, and with ``--json`` the error object on stdout."""
    text = one_line(message)
    print(f"{TOOL}: {word} [{reason}]: {text}", file=sys.stderr)
    if as_json:
        try:
            print(json.dumps({"status": word, "reason": reason, "message": text}), flush=True)
        except BrokenPipeError:
            detach_stdout()


def _usage(exc: UsageError, *, as_json: bool) -> int:
    return usage_error(exc, as_json=as_json)


def _causes(exc: BaseException) -> None:
    """``--verbose``: the chain of causes under the error line (types and messages only)."""
    seen: set[int] = set()
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        lines = str(cause).strip().splitlines() or [""]
        print(f"{TOOL}:   caused by {type(cause).__name__}: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            if line.strip():
                print(f"{TOOL}:     {line.strip()}", file=sys.stderr)
        cause = cause.__cause__ or cause.__context__
