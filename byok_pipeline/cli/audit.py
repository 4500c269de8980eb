"""``byok audit verify`` and ``byok audit export``: check and read the tamper-evident trail.

``verify [--from DATE] [--to DATE] [--expect-head SEQ:SHA256] [--json]`` re-reads the hash
chain (UTC days, inclusive) and reports the first broken link: exit 0 intact, 2 broken, 1
failure (storage, settings). ``--expect-head`` pins the head from outside the storage account
(Application Insights): a trail cut below that record, or rewritten, is broken.
``export --key NAME | --package SHA256 [--format json|csv]`` prints the complete history of one
key or one package from the trail, after verifying the chain it read (exit 2 if broken, the
history is printed all the same). Only storage is needed: ``BYOK_STORAGE`` (or
``BYOK_STORAGE__blobServiceUri``) and ``BYOK_AUDIT_CONTAINER``.

Hooked into ``byok`` by ``cli.py``; also runs alone: ``python -m byok_pipeline.cli.audit``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
from collections.abc import Sequence
from datetime import date
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_BROKEN = 0, 1, 2
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HEAD = re.compile(r"^([1-9][0-9]*):([0-9a-fA-F]{64})$")
#: CSV columns, in this order; fields outside the list follow, sorted.
CSV_COLUMNS = (
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
)
_NOT_CONTENT = frozenset({"sequence", "prev_sha256", "recorded", "record_sha256"})


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _sha256(text: str) -> str:
    if not _SHA256.match(text.lower()):
        raise argparse.ArgumentTypeError("a package SHA-256 is 64 hex digits")
    return text.lower()


def _expected_head(text: str) -> tuple[int, str]:
    match = _HEAD.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"not SEQUENCE:RECORD_SHA256 (a positive integer, a colon, 64 hex digits): {text!r}"
        )
    return int(match[1]), match[2].lower()


def add_audit_parser(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Add ``audit verify`` and ``audit export`` to the ``byok`` parser.

    ``common_parent`` carries ``--hsm-url``, ``--storage`` and ``--json``.
    """
    audit = subparsers.add_parser("audit", help="verify or export the tamper-evident audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    ver = audit_sub.add_parser(
        "verify",
        parents=[common_parent],
        help="re-read the hash chain and report the first broken link (exit 2)",
    )
    export = audit_sub.add_parser(
        "export",
        parents=[common_parent],
        help="print the complete history of one key or package from the trail",
    )
    for sub in (ver, export):
        sub.add_argument(
            "--from",
            dest="from_day",
            type=_day,
            metavar="DATE",
            help="first UTC day, YYYY-MM-DD (default: the start of the trail)",
        )
        sub.add_argument(
            "--to",
            dest="to_day",
            type=_day,
            metavar="DATE",
            help="last UTC day, YYYY-MM-DD (default: no limit, the end of the trail)",
        )
        sub.add_argument("--container", help="audit container (default: $BYOK_AUDIT_CONTAINER)")
    ver.add_argument(
        "--expect-head",
        type=_expected_head,
        metavar="SEQ:SHA256",
        help="the record_sha256 of sequence SEQ as recorded elsewhere (Application "
        "Insights): broken (exit 2) if the trail ends before SEQ or holds a "
        "different record there",
    )
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", metavar="NAME", help="the key name")
    which.add_argument("--package", metavar="SHA256", type=_sha256, help="the package SHA-256")
    export.add_argument("--format", choices=("json", "csv"), default="json")


def _reader(args: argparse.Namespace) -> Any:
    from byok_pipeline.audit.verify import TrailReader
    from byok_pipeline.core.settings import DEFAULTS, Settings
    from byok_pipeline.processing.wiring import blob_service

    env = dict(os.environ)
    if getattr(args, "storage", None):
        args.storage.apply(env)
    container = (
        args.container or env.get("BYOK_AUDIT_CONTAINER") or DEFAULTS["BYOK_AUDIT_CONTAINER"]
    )
    # Only storage is read: the HSM URL is not needed, any valid one satisfies Settings.
    hsm_url = getattr(args, "hsm_url", None) or env.get("BYOK_HSM_URL") or "https://unused.invalid"
    settings = Settings(hsm_url=hsm_url, audit_container=container)
    return TrailReader(blob_service(settings, env), container)


def cmd_audit(args: argparse.Namespace) -> int:
    """Run ``byok audit verify|export``. Exit 0 intact, 2 broken chain, 1 failure.

    Raises:
        ConfigError: storage is not configured.
        TransientError: storage failed.
    """
    from azure.core.exceptions import AzureError

    from byok_pipeline.adapters.transient import as_transient
    from byok_pipeline.core.errors import TransientError

    expect = getattr(args, "expect_head", None)
    if args.from_day and args.to_day and args.from_day > args.to_day:
        return _usage_error(args, "--from is after --to")
    if expect is not None and args.to_day is not None:
        return _usage_error(args, "--expect-head checks the end of the trail: drop --to")
    try:
        reader = _reader(args)
        report, lines = reader.verify(args.from_day, args.to_day, expect_head=expect)
    except AzureError as exc:
        raise as_transient(exc, "reading the audit trail") or TransientError(
            f"reading the audit trail: {type(exc).__name__} {getattr(exc, 'error_code', '') or ''}",
            reason="storage_error",
        ) from None
    if args.audit_command == "verify":
        return _print_verify(args, report)
    return _print_export(args, report, lines)


def _usage_error(args: argparse.Namespace, message: str) -> int:
    print(f"byok: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"status": "failed", "reason": "usage", "message": message}))
    return EXIT_FAILED


def _print_verify(args: argparse.Namespace, report: Any) -> int:
    result = report.to_dict()
    expected = report.expected_head
    undecided = report.ok and expected is not None and expected["found"] is None
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif report.ok:
        head = report.head
        print(
            f"audit trail intact: {report.records} records in {len(report.blobs)} blob(s)"
            + (f", head sequence {head['sequence']} sha256 {head['record_sha256']}" if head else "")
            + (f"; expected head: {expected['detail']}" if expected else "")
        )
    else:
        b = report.broken
        print(
            f"audit trail BROKEN at {b.blob} line {b.line} (sequence {b.sequence}, expected "
            f"{b.expected_sequence}): {b.kind}: {b.detail}"
        )
    if undecided:  # the range read cannot tell: not a verdict
        print(f"byok: --expect-head not checked: {expected['detail']}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if report.ok else EXIT_BROKEN


def history(
    lines: Sequence[Any], *, key: str | None, package: str | None
) -> tuple[list[dict[str, Any]], int]:
    """The records of one key (and of every package that imported into it) or one package,
    in trail order; copies of an event re-emitted after a retry are skipped (their count is
    returned)."""
    from byok_pipeline.audit.records import parse_line

    records = []
    for line in lines:
        try:
            records.append(parse_line(line.raw))
        except ValueError:
            continue  # verification reports it; the history keeps what can be read
    if key is not None:
        packages = {
            r["package_sha256"]
            for r in records
            if r.get("key_name") == key and r.get("package_sha256")
        }
        chosen = [
            r for r in records if r.get("key_name") == key or r.get("package_sha256") in packages
        ]
    else:
        chosen = [r for r in records if r.get("package_sha256") == package]
    seen: set[str] = set()
    unique, copies = [], 0
    for record in chosen:
        content = json.dumps(
            {k: v for k, v in record.items() if k not in _NOT_CONTENT}, sort_keys=True
        )
        if content in seen:
            copies += 1
            continue
        seen.add(content)
        unique.append(record)
    return unique, copies


def _print_export(args: argparse.Namespace, report: Any, lines: Sequence[Any]) -> int:
    records, copies = history(lines, key=args.key, package=args.package)
    if args.format == "csv":
        extra = sorted({k for r in records for k in r} - set(CSV_COLUMNS))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=[*CSV_COLUMNS, *extra], lineterminator="\n")
        writer.writeheader()
        # lists and objects (approvers) as JSON in their cell, never a Python repr
        writer.writerows(
            {
                k: json.dumps(v, sort_keys=True) if isinstance(v, list | dict) else v
                for k, v in r.items()
            }
            for r in records
        )
        sys.stdout.write(out.getvalue())
    else:
        query = {"key_name": args.key} if args.key else {"package_sha256": args.package}
        print(
            json.dumps(
                {
                    "query": query,
                    "chain": report.to_dict(),
                    "records": records,
                    "copies_skipped": copies,
                },
                indent=2,
                sort_keys=True,
            )
        )
    if not report.ok:
        b = report.broken
        print(
            f"byok: the audit trail is BROKEN at {b.blob} line {b.line}: {b.kind}: {b.detail}",
            file=sys.stderr,
        )
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
    try:
        return cmd_audit(args)
    except PipelineError as exc:
        print(f"byok: failed [{exc.reason}]: {exc.message}", file=sys.stderr)
        if args.json:  # as ``byok``'s own commands do: the error on stdout, as JSON
            print(json.dumps({"status": "failed", "reason": exc.reason, "message": exc.message}))
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
