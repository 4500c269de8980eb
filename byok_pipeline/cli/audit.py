"""``byok audit verify`` and ``byok audit export``: check and read the signed audit trail.

``verify [--from DATE] [--to DATE] [--trust FILE] [--expect-heads FILE] [--json]`` reads every
chain of both trail containers (the pipeline's, ``BYOK_AUDIT_CONTAINER``; the people's,
``BYOK_AUDIT_PEOPLE_CONTAINER``), checks hashes, links, seals, signatures, signers and roles, and
prints one line per break (chain, first bad sequence, kind, blob:line): exit 0 intact, 2 broken
(or a usage error), 1 failure (storage, settings, a bad trust or heads file). ``--trust`` (default
``$BYOK_AUDIT_TRUST_FILE``) pins the signers (without it, HSM signers are fetched from the HSM
and reported as unpinned); ``--expect-heads`` takes the
``heads`` of an earlier ``--json`` report (or the telemetry copy) and reports chains cut short
(``truncated``) or gone (``missing_chain``).

``export --key NAME | --package SHA256 [--format json|csv]`` prints the history of one key or
one package from every chain, merged by ``recorded``, after verifying what it read (exit 2 if
broken; the history is printed all the same).

Hooked into ``byok`` by ``cli/main.py``; also runs alone: ``python -m byok_pipeline.cli.audit``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from byok_pipeline.audit.verify import Report, TrailReader, TrailRecord, Trust

EXIT_OK, EXIT_FAILED, EXIT_BROKEN, EXIT_USAGE = 0, 1, 2, 2
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: CSV columns, in this order; fields outside the list follow, sorted.
CSV_COLUMNS = (
    "chain_id",
    "sequence",
    "recorded",
    "time",
    "event",
    "state",
    "key_name",
    "blob_name",
    "package_sha256",
    "etag",
    "target_type",
    "kek_kid",
    "imported_kid",
    "fingerprint_result",
    "reason_code",
    "message",
    "attempt",
    "uploader",
    "duplicate_of",
    "drop_time",
    "correlation_id",
    "kek_spki_sha256",
    "duration_ms",
    "pipeline_version",
    "prev_sha256",
    "record_sha256",
    "trail_verified",
)


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _sha256(text: str) -> str:
    if not _SHA256.match(text.lower()):
        raise argparse.ArgumentTypeError("a package SHA-256 is 64 hex digits")
    return text.lower()


def add_audit_parser(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Add ``audit verify`` and ``audit export`` to the ``byok`` parser.

    ``common_parent`` carries ``--hsm-url``, ``--storage`` and ``--json``.
    """
    from byok_pipeline.cli.audit_init import add_init_parser

    audit = subparsers.add_parser(
        "audit", help="create the signing key of, verify or export the signed audit trail"
    )
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    add_init_parser(audit_sub, common_parent)
    ver = audit_sub.add_parser(
        "verify",
        parents=[common_parent],
        help="check every chain's hashes, links and signatures; report each break (exit 2)",
    )
    export = audit_sub.add_parser(
        "export",
        parents=[common_parent],
        help="print the history of one key or package from every chain, by time",
    )
    for sub in (ver, export):
        sub.add_argument(
            "--from",
            dest="from_day",
            type=_day,
            metavar="DATE",
            help="first UTC day, YYYY-MM-DD (default: the start of every chain)",
        )
        sub.add_argument(
            "--to",
            dest="to_day",
            type=_day,
            metavar="DATE",
            help="last UTC day, YYYY-MM-DD (default: the end of every chain)",
        )
        sub.add_argument(
            "--trust",
            type=Path,
            metavar="FILE",
            help="the trusted signers (JSON: kid, spki_sha256, role, public_key_pem, "
            "revoked_after; default: $BYOK_AUDIT_TRUST_FILE); without one, HSM signers are "
            "fetched and reported as unpinned",
        )
        sub.add_argument("--container", help="pipeline trail container ($BYOK_AUDIT_CONTAINER)")
        sub.add_argument(
            "--people-container",
            help="people's trail container ($BYOK_AUDIT_PEOPLE_CONTAINER)",
        )
    ver.add_argument(
        "--expect-heads",
        type=Path,
        metavar="FILE",
        help='pinned heads, {"chains": {CHAIN: {"sequence", "record_sha256"}}} (the "heads" '
        "of an earlier --json report): a chain cut short or gone is broken",
    )
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", metavar="NAME", help="the key name")
    which.add_argument("--package", metavar="SHA256", type=_sha256, help="the package SHA-256")
    export.add_argument("--format", choices=("json", "csv"), default="json")


def _env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if getattr(args, "storage", None):
        args.storage.apply(env)
    return env


def _reader(args: argparse.Namespace, env: Mapping[str, str]) -> TrailReader:
    """Raises: ConfigError: storage is not configured."""
    from byok_pipeline.audit.verify import TrailReader
    from byok_pipeline.cli.failures import cli_clients
    from byok_pipeline.core.settings import DEFAULTS, Settings
    from byok_pipeline.processing.wiring import blob_service

    container = (
        args.container or env.get("BYOK_AUDIT_CONTAINER") or DEFAULTS["BYOK_AUDIT_CONTAINER"]
    )
    people = (
        args.people_container
        or env.get("BYOK_AUDIT_PEOPLE_CONTAINER")
        or DEFAULTS["BYOK_AUDIT_PEOPLE_CONTAINER"]
    )
    settings = Settings.from_env(env, require_hsm=False)  # only storage is read here
    return TrailReader(
        blob_service(settings, env, profile=cli_clients(settings)), container, people
    )


def hsm_key_fetcher(
    env: Mapping[str, str], *, only_vault: str | None, credential: Any = None
) -> Callable[[str], ec.EllipticCurvePublicKey | None]:
    """Fetch an HSM key's public half by its versioned kid (None: no such EC P-256 key).

    ``only_vault``: fetch only from this HSM (unpinned signers: a kid naming another host is
    not looked up); None: from the host the kid names (its SPKI is pinned by the trust file).
    ``credential``: default, the emulator's when ``BYOK_HSM_EMULATOR_DIR`` is set (local
    runs), else the process's identity (``az login``, a managed identity);
    ``BYOK_HSM_CA_BUNDLE`` in ``env`` is honoured. The returned callable raises TransientError
    when the HSM cannot be reached.
    """
    clients: dict[str, Any] = {}

    def fetch(kid: str) -> ec.EllipticCurvePublicKey | None:
        from azure.core.exceptions import AzureError, ResourceNotFoundError
        from azure.keyvault.keys import KeyVaultKeyIdentifier

        from byok_pipeline.adapters.transient import as_transient
        from byok_pipeline.audit.signers import p256_public_key
        from byok_pipeline.cli.failures import cli_clients
        from byok_pipeline.core.errors import TransientError
        from byok_pipeline.core.settings import Settings
        from byok_pipeline.processing.wiring import key_client

        try:
            ident = KeyVaultKeyIdentifier(kid)
        except ValueError:
            return None
        vault = ident.vault_url.rstrip("/")
        if only_vault is not None and vault != only_vault.rstrip("/"):
            return None
        if vault not in clients:
            settings = Settings(hsm_url=vault)
            clients[vault] = key_client(
                settings,
                credential or _credential(env),
                ca_bundle=env.get("BYOK_HSM_CA_BUNDLE"),
                profile=cli_clients(settings),
            )
        try:
            key = clients[vault].get_key(ident.name, ident.version)
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise as_transient(exc, f"reading the audit signing key {kid}") or TransientError(
                f"reading the audit signing key {kid}: {type(exc).__name__}"
            ) from None
        jwk: Any = key.key
        crv = str(getattr(jwk.crv, "value", jwk.crv))
        if crv != "P-256" or not jwk.x or not jwk.y:
            return None
        return p256_public_key(jwk)

    return fetch


def _credential(env: Mapping[str, str]) -> Any:
    """As ``byok``'s other HSM commands: the emulator's token credential for a local stack,
    else the Azure default chain."""
    emulator_dir = env.get("BYOK_HSM_EMULATOR_DIR")
    if emulator_dir:
        from byok_pipeline.localdev.stack import emulator_credential

        return emulator_credential(emulator_dir)
    from byok_pipeline.processing.wiring import default_credential

    return default_credential(env)


def load_heads(path: Path) -> dict[str, dict[str, Any]]:
    """``{"chains": {...}}``, or a whole ``--json`` report (its ``heads`` are taken).

    Raises:
        ConfigError: unreadable, or not heads.
    """
    from byok_pipeline.core.errors import ConfigError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"expected heads {path}: {exc.strerror or 'unreadable'}") from None
    except ValueError:
        raise ConfigError(f"expected heads {path} is not JSON") from None
    if isinstance(data, dict) and isinstance(data.get("heads"), dict):
        data = data["heads"]
    chains = data.get("chains") if isinstance(data, dict) else None
    if not isinstance(chains, dict) or not all(
        isinstance(v, dict)
        and isinstance(v.get("sequence"), int)
        and isinstance(v.get("record_sha256"), str)
        for v in chains.values()
    ):
        raise ConfigError(
            f'expected heads {path}: not {{"chains": {{CHAIN: {{"sequence", "record_sha256"}}}}}}'
        )
    return chains


def cmd_audit(args: argparse.Namespace) -> int:
    """Run ``byok audit verify|export``. Exit 0 intact, 2 broken, 1 failure.

    Raises:
        ConfigError: storage is not configured; the trust or heads file is not valid.
        TransientError: storage or the HSM failed.
    """
    from azure.core.exceptions import AzureError

    from byok_pipeline.adapters.transient import as_transient
    from byok_pipeline.audit.verify import Trust
    from byok_pipeline.core.errors import TransientError

    heads_file = getattr(args, "expect_heads", None)
    if args.from_day and args.to_day and args.from_day > args.to_day:
        return _usage_error(args, "--from is after --to")
    if heads_file is not None and (args.from_day or args.to_day):
        return _usage_error(args, "--expect-heads checks whole chains: drop --from and --to")
    env = _env(args)
    trust_file = args.trust or env.get("BYOK_AUDIT_TRUST_FILE") or None
    trust: Trust | None = Trust.load(trust_file) if trust_file else None
    heads = load_heads(heads_file) if heads_file is not None else None
    hsm_url = getattr(args, "hsm_url", None) or env.get("BYOK_HSM_URL")
    fetch = hsm_key_fetcher(env, only_vault=None if trust else (hsm_url or ""))
    try:
        reader = _reader(args, env)
        report, records = reader.verify(
            args.from_day, args.to_day, trust=trust, fetch_key=fetch, expected_heads=heads
        )
    except AzureError as exc:
        raise as_transient(exc, "reading the audit trail") or TransientError(
            f"reading the audit trail: {type(exc).__name__} {getattr(exc, 'error_code', '') or ''}",
            reason="storage_error",
        ) from None
    if args.audit_command == "verify":
        return _print_verify(args, report)
    return _print_export(args, report, records)


def _usage_error(args: argparse.Namespace, message: str) -> int:
    """A usage error found after parsing: as argparse's (one line, exit 2)."""
    print(f"byok: usage error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"status": "usage", "reason": "usage", "message": message}))
    return EXIT_USAGE


def terminal_safe(text: str) -> str:
    """``text`` with every character a terminal would act on, or could not print, escaped
    (control characters such as ESC and CR, lone surrogates): a break names what a stored line
    holds, which whoever wrote the line chose."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _break_lines(report: Report) -> list[str]:
    return [
        terminal_safe(
            f"{b.chain_id} sequence {b.sequence}: {b.kind}"
            + (f" at {b.blob}:{b.line}" if b.blob else "")
            + f": {b.detail}"
        )
        for b in report.breaks
    ]


#: A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: object) -> object:
    """A CSV cell: lists and objects (approvers, the signature) as JSON, never a repr; text
    made terminal-safe, and prefixed with ``'`` when a spreadsheet would take it for a formula
    (uploaders choose blob names and the uploader field)."""
    if isinstance(value, list | dict):
        value = json.dumps(value, sort_keys=True)
    if not isinstance(value, str):
        return value
    return _csv_text(value)


def _csv_text(text: str) -> str:
    return ("'" if text.startswith(_FORMULA_START) else "") + terminal_safe(text)


def _print_verify(args: argparse.Namespace, report: Report) -> int:
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    elif report.ok:
        print(
            f"audit trail intact: {len(report.chains)} chain(s), {report.records} records in "
            f"{report.blobs} blob(s)"
        )
    else:
        print(f"audit trail BROKEN: {len(report.breaks)} break(s)")
        for line in _break_lines(report):
            print(line)
    if not report.pinned and report.chains:
        unpinned = sorted(c for c, s in report.chains.items() if s.trust == "unpinned")
        if unpinned:
            print(
                f"byok: {len(unpinned)} chain(s) signed by HSM keys not pinned by --trust: "
                "their signatures verify, but which keys may sign was not checked",
                file=sys.stderr,
            )
    return EXIT_OK if report.ok else EXIT_BROKEN


def history(
    records: Sequence[Mapping[str, Any]],
    *,
    key: str | None,
    package: str | None,
    vouched: Mapping[str, frozenset[int]] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """The records of one key (and of every package a record names it in) or one package,
    merged across chains by ``recorded`` (then chain and sequence); copies of an event
    re-emitted after a retry are skipped (their count is returned). Trail start and seal
    records are never part of a history. With ``vouched`` (:meth:`Report.vouched`) each record
    says whether the verification vouches for it (``trail_verified``), and of copies a vouched
    one is kept: a record anyone appended, with any ``recorded``, never hides a signed one."""
    from byok_pipeline.audit.records import SEAL_EVENT, START_EVENT, TRAIL_FIELDS

    # a retried event's copies differ only in the trail's fields (and in what export adds)
    not_content = {*TRAIL_FIELDS, "trail_verified"}

    events = [dict(r) for r in records if r.get("event") not in (START_EVENT, SEAL_EVENT)]
    if key is not None:
        packages = {
            r["package_sha256"]
            for r in events
            if r.get("key_name") == key and isinstance(r.get("package_sha256"), str)
        }
        chosen = [
            r
            for r in events
            if r.get("key_name") == key
            or (isinstance(r.get("package_sha256"), str) and r["package_sha256"] in packages)
        ]
    else:
        chosen = [r for r in events if r.get("package_sha256") == package]

    def merged(r: Mapping[str, Any]) -> tuple[str, str, int]:
        return str(r.get("recorded")), str(r.get("chain_id")), int(r.get("sequence") or 0)

    chosen.sort(key=merged)
    if vouched is not None:
        for record in chosen:
            sequences = vouched.get(str(record.get("chain_id")), frozenset())
            record["trail_verified"] = record.get("sequence") in sequences
    seen: dict[str, int] = {}  # content -> index in unique
    unique: list[dict[str, Any]] = []
    copies = 0
    for record in chosen:
        content = json.dumps(
            {k: v for k, v in record.items() if k not in not_content}, sort_keys=True
        )
        if content in seen:
            copies += 1
            kept = seen[content]
            if record.get("trail_verified") and not unique[kept].get("trail_verified"):
                unique[kept] = record
            continue
        seen[content] = len(unique)
        unique.append(record)
    unique.sort(key=merged)  # a vouched copy kept in an earlier one's place sorts as itself
    return unique, copies


def _print_export(args: argparse.Namespace, report: Report, stored: Sequence[TrailRecord]) -> int:
    records, copies = history(
        [s.record for s in stored], key=args.key, package=args.package, vouched=report.vouched()
    )
    if args.format == "csv":
        extra = sorted({k for r in records for k in r} - set(CSV_COLUMNS))
        out = io.StringIO()
        fields = [*CSV_COLUMNS, *map(_csv_text, extra)]  # field names are the writer's too
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows({_csv_text(k): _csv_cell(v) for k, v in r.items()} for r in records)
        sys.stdout.write(out.getvalue())
    else:
        query = {"key_name": args.key} if args.key else {"package_sha256": args.package}
        print(
            json.dumps(
                {
                    "query": query,
                    "trail": report.to_dict(),
                    "records": records,
                    "copies_skipped": copies,
                },
                indent=2,
                sort_keys=True,
            )
        )
    if not report.ok:
        print(f"byok: the audit trail is BROKEN ({len(report.breaks)} break(s)):", file=sys.stderr)
        for line in _break_lines(report):
            print(f"byok:   {line}", file=sys.stderr)
        return EXIT_BROKEN
    if not records:
        print("byok: no record matches", file=sys.stderr)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m byok_pipeline.cli.audit verify|export ...`` (the same as ``byok audit``)."""
    from byok_pipeline.cli.storage_arg import add_storage_option
    from byok_pipeline.core.errors import PipelineError

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--hsm-url", help=argparse.SUPPRESS)
    add_storage_option(common)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    parser = argparse.ArgumentParser(prog="byok")
    sub = parser.add_subparsers(dest="command", required=True)
    add_audit_parser(sub, common)
    args = parser.parse_args(["audit", *(argv if argv is not None else sys.argv[1:])])
    if args.audit_command == "init":  # needs the HSM wiring of the full CLI
        print("byok: use `byok audit init` (it creates a key in the HSM)", file=sys.stderr)
        return 2
    try:
        return cmd_audit(args)
    except PipelineError as exc:
        print(f"byok: failed [{exc.reason}]: {exc.message}", file=sys.stderr)
        if args.json:  # as ``byok``'s own commands do: the error on stdout, as JSON
            print(json.dumps({"status": "failed", "reason": exc.reason, "message": exc.message}))
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
