"""``byok``: the connected side's command line (KEKs, upload, import, status, watch, dev stack).

Settings come from the same environment variables as the Function (flags override).
Exit codes: 0 success; 2 refused (the reason code on stderr) or a usage error; 1 failure (a
retry, a login or a setting may help); 130 interrupted; 141 the output's reader went away
(:mod:`byok_pipeline.cli.failures`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from byok_pipeline import __version__
from byok_pipeline.cli.audit import add_audit_parser, cmd_audit
from byok_pipeline.cli.authorization import add_parsers as add_authorization_parsers
from byok_pipeline.cli.failures import cli_clients, run
from byok_pipeline.cli.serve import add_serve_parser
from byok_pipeline.cli.storage_arg import add_storage_option
from byok_pipeline.core.errors import ConfigError, PipelineError, Rejected, TransientError
from byok_pipeline.core.reasons import CLI_REASONS, REASONS
from byok_pipeline.core.settings import Settings
from offline_packager.atomic import write_files_atomically
from offline_packager.cli_exit import CliParser
from offline_packager.kid import is_key_name, parse_kid

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2


def _settings(args: argparse.Namespace, *, require_hsm: bool = True) -> Settings:
    """Settings from the environment; ``--hsm-url``/``--storage`` override it for this process
    (every client built later, the audit trail's included, sees the same values)."""
    if getattr(args, "hsm_url", None):
        os.environ["BYOK_HSM_URL"] = args.hsm_url
    if getattr(args, "storage", None):
        args.storage.apply()
    return Settings.from_env(require_hsm=require_hsm)


def _store(settings: Settings) -> Any:
    """Storage only (status, upload): no HSM settings needed."""
    from byok_pipeline.adapters.blobstore import BlobStore
    from byok_pipeline.processing.wiring import blob_service

    return BlobStore(blob_service(settings, profile=cli_clients(settings)), settings)


def _credential() -> Any:
    """The emulator's credential when BYOK_HSM_EMULATOR_DIR is set (local runner); else the
    Azure default chain (managed identity, Azure CLI login, ...)."""
    emulator_dir = os.environ.get("BYOK_HSM_EMULATOR_DIR")
    if emulator_dir:
        from byok_pipeline.localdev.stack import emulator_credential

        return emulator_credential(emulator_dir)
    from byok_pipeline.processing.wiring import default_credential

    return default_credential()


def _hsm(settings: Settings) -> Any:
    from byok_pipeline.processing.wiring import hsm_adapter

    return hsm_adapter(
        settings,
        _credential(),
        ca_bundle=os.environ.get("BYOK_HSM_CA_BUNDLE"),
        profile=cli_clients(settings),
    )


def _deps(settings: Settings) -> Any:
    from byok_pipeline.processing.wiring import build_deps

    env = dict(os.environ)
    if settings is not None and getattr(settings, "hsm_url", None):
        env["BYOK_HSM_URL"] = settings.hsm_url
    return build_deps(
        settings,
        env=env,
        credential=_credential(),
        ca_bundle=os.environ.get("BYOK_HSM_CA_BUNDLE"),
        profile=cli_clients(settings),
    )


def _audit_sink(settings: Settings) -> Any:
    """The audit sink, built before the HSM is touched: no KEK change without its record.

    Raises:
        ConfigError: neither the audit trail's storage nor BYOK_AUDIT_LOG is configured.
    """
    from byok_pipeline.processing.wiring import audit_sink

    # a person runs the CLI: their records go to their own chain, signed by their own key
    return audit_sink(
        settings,
        role="person",
        credential=_credential()
        if (settings.audit_person_key or "").startswith("https://")
        else None,
        ca_bundle=os.environ.get("BYOK_HSM_CA_BUNDLE"),
        profile=cli_clients(settings),
    )


def _audit(sink: Any, event: dict[str, Any]) -> None:
    from byok_pipeline.processing.processor import emit_or_retry

    emit_or_retry(sink, event)


def _out(args: argparse.Namespace, result: dict[str, Any], human: str) -> None:
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else human)


# -- kek ------------------------------------------------------------------------------------------
def cmd_kek_create(args: argparse.Namespace) -> int:
    from byok_pipeline.audit.events import cli_event
    from offline_packager.kid import KEY_NAME_RE

    if not KEY_NAME_RE.fullmatch(args.name):
        raise Rejected("bad_key_name", "a key name is 1-127 of 0-9 a-z A-Z -")
    settings = _settings(args)
    sink = _audit_sink(settings)
    hsm = _hsm(settings)
    if not args.new_version and _exists(hsm, args.name):
        raise Rejected(
            "kek_exists", f"a key named {args.name} exists; give --new-version to add a version"
        )
    expires = datetime.now(UTC) + timedelta(days=args.expires_days) if args.expires_days else None
    cid = uuid.uuid4().hex
    try:
        key = hsm.client.create_rsa_key(
            args.name,
            size=args.size,
            hardware_protected=True,
            key_operations=["import"],
            expires_on=expires,
            request_id=cid,
        )
    except Exception as exc:  # noqa: BLE001  # translated below into exit codes
        return _sdk_failure(exc, "creating the KEK")
    _audit(
        sink,
        cli_event("byok.kek.created", correlation_id=cid, kek_kid=str(key.id), key_name=args.name),
    )
    result = {
        "kid": str(key.id),
        "key_size": args.size,
        "key_ops": ["import"],
        "expires_on": expires.isoformat() if expires else None,
    }
    _out(
        args,
        result,
        f"created KEK {key.id}\n  RSA-{args.size}, operations: import only"
        + (f", expires {expires:%Y-%m-%d}" if expires else ""),
    )
    return EXIT_OK


def _exists(hsm: Any, name: str) -> bool:
    from azure.core.exceptions import AzureError, ResourceNotFoundError

    try:
        hsm.client.get_key(name)
    except ResourceNotFoundError:
        return False
    except AzureError as exc:
        from byok_pipeline.adapters.keyvault import translate

        raise translate(exc, "looking for the key") from None
    return True


def _kek_kid_arg(args: argparse.Namespace, settings: Settings, hsm: Any) -> str:
    """The KEK's kid from --kid, $BYOK_KEK_KID or the latest version of --name.

    Raises:
        Rejected: ``bad_kid`` (none given), ``not_found`` (no key of that name).
        TransientError: the HSM call failed.
    """
    from azure.core.exceptions import AzureError, ResourceNotFoundError

    from byok_pipeline.adapters.keyvault import translate

    kid_text: str | None = args.kid or settings.kek_kid
    if not kid_text and args.name:
        try:
            kid_text = str(hsm.client.get_key(args.name).id)
        except ResourceNotFoundError:
            raise Rejected("not_found", f"no key named {args.name} in this HSM") from None
        except AzureError as exc:
            raise translate(exc, "reading the KEK") from None
    if not kid_text:
        raise Rejected("bad_kid", "give --kid, --name or set BYOK_KEK_KID")
    return kid_text


def cmd_kek_download(args: argparse.Namespace) -> int:
    """``byok kek download``: the KEK's public PEM, and with ``--attestation`` its attestation
    (both written atomically, both audited in one ``byok.kek.downloaded`` record)."""
    from byok_pipeline.audit.events import cli_event
    from byok_pipeline.processing.kek_info import kek_attestation, kek_info

    settings = _settings(args)
    sink = _audit_sink(settings)
    hsm = _hsm(settings)
    kid = parse_kid(_kek_kid_arg(args, settings, hsm), expected_host=settings.hsm_host)
    cid = uuid.uuid4().hex
    info = kek_info(hsm, kid, request_id=cid)
    attestation_out = getattr(args, "attestation", None)
    pem_out = getattr(args, "out", None)
    files: list[tuple[Path, bytes]] = []
    if pem_out:
        files.append((Path(pem_out), info["public_key_pem"].encode()))
    attestation: dict[str, Any] | None = None
    if attestation_out:
        attestation = kek_attestation(hsm, parse_kid(info["kid"]), request_id=cid)
        files.append((Path(attestation_out), attestation["bytes"]))
    write_files_atomically(files, force=args.force)
    _audit(
        sink,
        cli_event(
            "byok.kek.downloaded",
            correlation_id=cid,
            kek_kid=info["kid"],
            key_name=parse_kid(info["kid"]).name,
            kek_spki_sha256=info["spki_sha256"],
            attestation_sha256=attestation["sha256"] if attestation else None,
        ),
    )
    result = {k: v for k, v in info.items() if k != "public_key_pem"}
    lines = []
    if pem_out:
        result["pem"] = pem_out
        lines.append(f"wrote {pem_out}")
    if attestation is not None:
        result |= {"attestation": attestation_out, "attestation_sha256": attestation["sha256"]}
        lines.append(f"wrote {attestation_out} (attestation SHA-256 {attestation['sha256']})")
    lines += [f"  kid:          {info['kid']}", f"  SPKI SHA-256: {info['spki_sha256']}"]
    if attestation_out:
        check = f" --kek-attestation {attestation_out}"
        lines.append(
            "  On the offline machine, verify the attestation first: byok-package "
            f"verify-kek-attestation {attestation_out} --kek {pem_out or 'KEK.pem'} "
            f"--kek-kid {info['kid']} --kek-sha256 {info['spki_sha256']}"
        )
    else:
        check = ""
        lines.append(
            "  No attestation downloaded: add --attestation FILE so the custodian can check the "
            "KEK lives in the HSM"
        )
    lines.append(
        f"  Carry them to the offline machine: byok-package wrap --kek {pem_out or 'KEK.pem'} "
        f"--kek-kid {info['kid']} --kek-sha256 {info['spki_sha256']}{check} ..."
    )
    _out(args, result, "\n".join(lines))
    return EXIT_OK


# -- upload / import ------------------------------------------------------------------------------
def _read_package(path: str, limit: int) -> bytes:
    """Raises: Rejected (``file_not_found``, ``unreadable_input``, ``too_large``,
    ``plaintext_key``)."""
    from byok_pipeline.cli.files import read_local

    return read_local(path, what="package", limit=limit)


def _manifest_path(args: argparse.Namespace) -> Path | None:
    if args.manifest:
        return Path(args.manifest)
    beside = Path(args.package).with_suffix(".manifest.json")
    return beside if beside.is_file() and not args.no_manifest else None


def _with_tags(options: Any, tags: list[str]) -> Any:
    """Add ``--tag KEY=VALUE`` options, checked like upload metadata.

    Raises:
        Rejected: ``bad_metadata``.
    """
    import dataclasses

    from byok_pipeline.core.metadata import parse_tags

    if not tags:
        return options
    pairs = dict(t.split("=", 1) for t in tags if "=" in t)
    if len(pairs) != len(tags):
        raise Rejected("bad_metadata", "--tag takes KEY=VALUE")
    return dataclasses.replace(options, tags=parse_tags(json.dumps(pairs)))


def cmd_upload(args: argparse.Namespace) -> int:
    """The gate (:mod:`byok_pipeline.cli.gate`), then the manifest, the approvals and the
    package, in that order."""
    from byok_pipeline.cli.upload import default_uploader

    settings = _settings(args, require_hsm=False)
    result, manifest = _gate_and_upload(
        settings,
        Path(args.package),
        blob_name=args.name or Path(args.package).name,
        manifest_path=_manifest_path(args),
        uploader=args.uploader or default_uploader(),
        tags=args.tag,
        new_version=args.new_version,
        force_offline=args.force_offline,
    )
    online = result["checks"]["online"]
    checked = online if isinstance(online, dict) else None
    skipped = None if checked else online.removeprefix("skipped: ")
    _out(args, result, _upload_text(result, manifest, checked, skipped))
    return EXIT_OK


def _gate_and_upload(
    settings: Settings,
    package: Path,
    *,
    blob_name: str,
    manifest_path: Path | None,
    uploader: str,
    tags: list[str],
    new_version: bool,
    force_offline: bool,
    same_is_done: bool = False,
) -> tuple[dict[str, Any], bool]:
    """``byok upload``'s work, shared with ``byok drop``: the gate, then the manifest, the
    approvals and the package; the result and whether a manifest went with it.
    ``same_is_done``: a blob of that name already waiting with the same bytes is this upload,
    done before (``already_waiting`` in the result), not a ``duplicate_upload``.

    Raises:
        Rejected: the gate's refusals; ``duplicate_upload`` (other bytes wait under the name).
        TransientError: the HSM or storage failed.
    """
    from byok_pipeline.cli.authorization import upload_attachments
    from byok_pipeline.cli.gate import check_locally, check_online
    from byok_pipeline.cli.upload import options_for, read_manifest_file, upload
    from byok_pipeline.processing.processor import key_name_of

    data = _read_package(str(package), settings.max_package_bytes)
    manifest = read_manifest_file(manifest_path)
    options = _with_tags(options_for(data, manifest, uploader), tags)
    local = check_locally(
        package,
        data,
        key_name=key_name_of(blob_name),
        options=options,
        manifest=manifest[1] if manifest else None,
        settings=settings,
    )
    online: dict[str, Any] | None = None
    if force_offline or not settings.hsm_url:
        skipped = "--force-offline" if force_offline else "BYOK_HSM_URL is not set"
    else:
        skipped = None
        online = check_online(
            local,
            settings=settings,
            hsm=_hsm(settings),
            authz=_authz(settings),
            new_version=new_version,
            clock=lambda: datetime.now(UTC),
        )
    from azure.core.exceptions import ResourceExistsError

    from byok_pipeline.adapters.authorization_store import AuthorizationStore

    store = _store(settings)
    attached = upload_attachments(AuthorizationStore(store.service, settings), local.beside)
    try:
        result = upload(store, blob_name, data, options)
    except ResourceExistsError:
        if not (same_is_done and _waiting_sha256(store, blob_name) == local.sha256):
            raise Rejected(
                "duplicate_upload",
                f"{blob_name} is already waiting in {settings.incoming_container}",
            ) from None
        result = {
            "blob_name": blob_name,
            "container": settings.incoming_container,
            "package_sha256": local.sha256,
            "already_waiting": True,
        }
    result["attachments"] = attached
    result["checks"] = {"local": "passed", "online": online or f"skipped: {skipped}"}
    return result, options.fingerprint is not None


def _waiting_sha256(store: Any, blob_name: str) -> str | None:
    """The SHA-256 of the blob waiting under ``blob_name`` (None: over the size cap).

    Raises:
        TransientError: storage failed, or the blob went meanwhile (processed: the next try
            finds it imported).
    """
    from byok_pipeline.adapters.blobstore import BlobGone

    try:
        blob = store.read_incoming(blob_name)
    except BlobGone as exc:
        raise TransientError(f"{exc.message}; it is checked again", reason="transient") from None
    return None if blob.data is None else hashlib.sha256(blob.data).hexdigest()


def cmd_drop(args: argparse.Namespace) -> int:
    """``byok drop DIR``: every complete package in DIR through ``byok upload``
    (:mod:`byok_pipeline.cli.drop`)."""
    from byok_pipeline.cli.drop import run_drop
    from byok_pipeline.cli.upload import default_uploader

    settings = _settings(args, require_hsm=False)
    uploader = args.uploader or default_uploader()

    def upload_one(package: Path, manifest: Path | None) -> dict[str, Any]:
        result, _ = _gate_and_upload(
            settings,
            package,
            blob_name=package.name,
            manifest_path=manifest,
            uploader=uploader,
            tags=[],
            new_version=args.new_version,
            force_offline=args.force_offline,
            same_is_done=True,
        )
        return result

    return run_drop(
        Path(args.folder),
        upload=upload_one,
        as_json=args.json,
        once=args.once,
        interval=args.interval,
        done_marker=args.done_marker,
    )


def _upload_text(
    result: dict[str, Any], manifest: bool, online: dict[str, Any] | None, skipped: str | None
) -> str:
    lines = [
        (
            f"uploaded {result['blob_name']} to {result['container']} "
            f"(SHA-256 {result['package_sha256']})"
        )
    ]
    if online is None:
        lines.append(f"  checked locally only ({skipped}): the pipeline checks it against the HSM")
    else:
        lines.append(f"  checked against the HSM: KEK {online['kek_kid']}, {online['target_type']}")
        if online["new_version_of"]:
            lines.append(f"  it will be the next version of {online['new_version_of']}")
        if online["approvals_missing"]:
            wait = online["approvals_missing"]
            lines.append(
                f"  waits for {wait['missing']} more of {wait['required']} approval(s) "
                "(`byok approve upload`)"
            )
    if not manifest:
        lines.append("  no manifest: the import will be 'unverified'")
    approvals = len(result["attachments"]["approvals"])
    if approvals:
        lines.append(f"  with {approvals} approval(s)")
    return "\n".join(lines)


def _authorize_direct(settings: Settings, hsm: Any, doc: Any, target_type: str) -> None:
    """``byok import`` honours the same rules: the policy when storage is configured (a name
    that needs approvals goes through ``byok upload``), and the existing-key protection always.

    Raises:
        Rejected: ``key_name_not_allowed``, ``target_type_not_allowed_for_name``,
            ``approval_invalid``, ``existing_key_protected``, ``policy_invalid``.
        ConfigError: BYOK_POLICY_REQUIRED is true and no storage is configured (the policy
            cannot be read, so nothing may be imported without it).
    """
    from byok_pipeline.core.policy import check_existing_key, check_name, check_target_type

    storage = os.environ.get("BYOK_STORAGE") or os.environ.get(
        "BYOK_STORAGE__blobServiceUri"  # noqa: SIM112  # the Functions identity-connection name
    )
    if settings.policy_required and not storage:  # review finding: the policy was skipped
        raise ConfigError(
            "BYOK_POLICY_REQUIRED is true but no storage is configured, so the import policy "
            "cannot be read: set BYOK_STORAGE (the account holding the policy) and run again"
        )
    policy = _authz(settings).policy() if storage else None
    doc.policy_sha256 = policy.sha256 if policy else None
    rule = check_name(policy, doc.key_name, kek_name=settings.kek_name)
    if rule is not None and rule.approvals is not None:
        raise Rejected(
            "approval_invalid",
            f"the import policy requires {rule.approvals.required} approval(s) for "
            f"{doc.key_name!r}: upload the package with its manifest and approvals "
            "(`byok upload`) instead of importing it directly",
        )
    check_target_type(rule, doc.key_name, target_type)
    existing = hsm.existing_key(doc.key_name, request_id=doc.correlation_id)
    check_existing_key(existing, rule, doc.key_name, policy=policy is not None)


def cmd_import(args: argparse.Namespace) -> int:
    """Validate, import and verify one package without storage; audited like the pipeline."""
    from byok_pipeline.cli.upload import default_uploader, options_for, read_manifest_file
    from byok_pipeline.core.status import StatusDoc
    from byok_pipeline.processing.importer import fingerprint_result, import_validated, validate
    from byok_pipeline.processing.processor import key_name_of

    settings = _settings(args)
    data = _read_package(args.package, settings.max_package_bytes)
    key_name = args.name or key_name_of(Path(args.package).name)
    manifest = read_manifest_file(_manifest_path(args))
    options = _with_tags(options_for(data, manifest, default_uploader()), args.tag)
    sink = _audit_sink(settings)
    hsm = _hsm(settings)
    cid = uuid.uuid4().hex
    sha = hashlib.sha256(data).hexdigest()
    doc = StatusDoc(
        blob_name=Path(args.package).name,
        package_sha256=sha,
        etag="byok-import",
        correlation_id=cid,
        key_name=key_name,
        uploader=options.uploader,
    )
    record = _Recorder(doc, sink)
    record("received")
    try:
        validated = validate(
            data,
            options,
            settings=settings,
            hsm=hsm,
            clock=lambda: datetime.now(UTC),
            request_id=cid,
        )
    except Rejected as exc:
        record("rejected", reason=exc.reason, message=exc.message)
        raise
    doc.target_type, doc.kek_kid = validated.target_type.name, validated.kek_kid.kid
    existing = hsm.find_imported(key_name, sha, request_id=cid)
    if existing is None:
        try:
            _authorize_direct(settings, hsm, doc, validated.target_type.name)
        except Rejected as exc:
            record("rejected", reason=exc.reason, message=exc.message)
            raise
        record("validated")
        record("importing")
    imported = existing or import_validated(
        hsm,
        key_name,
        data=data,
        package_sha256=sha,
        validated=validated,
        options=options,
        request_id=cid,
    )
    doc.imported_kid = imported.kid
    result = fingerprint_result(
        hsm, imported, options.fingerprint, validated.target_type.name, request_id=cid
    )
    doc.fingerprint_result = result
    summary = {
        "key_name": key_name,
        "imported_kid": imported.kid,
        "package_sha256": sha,
        "target_type": validated.target_type.name,
        "fingerprint_result": result,
        "already_imported": existing is not None,
        "correlation_id": cid,
    }
    if result == "mismatch":
        hsm.disable_version(imported.name, imported.version, request_id=cid)
        record(
            "verification_failed",
            reason="fingerprint_mismatch",
            message=REASONS["fingerprint_mismatch"],
        )
        summary["reason_code"] = "fingerprint_mismatch"
        _out(args, summary, f"verification FAILED for {imported.kid}: the version was disabled")
        print(
            f"byok: refused [fingerprint_mismatch]: {REASONS['fingerprint_mismatch']}",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    if existing is not None:
        doc.duplicate_of = existing.kid
    record("imported" if existing is None else "duplicate")
    _out(
        args,
        summary,
        f"{'already imported' if existing else 'imported'} {imported.kid}\n"
        f"  {validated.target_type.name}, fingerprint: {result}",
    )
    return EXIT_OK


class _Recorder:
    """Advances an in-memory status document and audits each state (``byok import``)."""

    def __init__(self, doc: Any, sink: Any) -> None:
        self.doc = doc
        self.sink = sink

    def __call__(
        self, state: str, *, reason: str | None = None, message: str | None = None
    ) -> None:
        from byok_pipeline.audit.events import event_for_state, verified_event

        self.doc.reason_code, self.doc.message = reason, message
        if self.doc.advance(state, datetime.now(UTC)):
            entry = self.doc.history[-1]
            _audit(self.sink, event_for_state(self.doc, state, entry.attempt, entry.time))
            if state == "imported" and self.doc.fingerprint_result == "match":
                _audit(self.sink, verified_event(self.doc, entry))


# -- status / watch -------------------------------------------------------------------------------
def _status_states() -> tuple[str, ...]:
    from byok_pipeline.cli.status_view import LISTED_STATES

    return LISTED_STATES


def cmd_status(args: argparse.Namespace) -> int:
    """One package (by blob name or key name) in detail, or a table of all, waiting blobs
    included, oldest first."""
    from byok_pipeline.cli import status_view as view

    settings = _settings(args, require_hsm=False)
    store = _store(settings)
    now = datetime.now(UTC)
    colour = view.use_colour(sys.stdout)
    if args.name:
        doc = store.status_by_blob_or_key_name(args.name)
        if doc is None:
            waiting = store.list_incoming()
            blob_name = args.name
            if blob_name not in waiting and is_key_name(args.name):
                blob_name = f"{args.name}.byok"
            if blob_name in waiting:
                _out(
                    args,
                    {"blob_name": blob_name, "state": "waiting"},
                    f"{blob_name}: waiting in {settings.incoming_container} (not delivered yet)",
                )
                return EXIT_OK
            raise Rejected("not_found", f"no package named {blob_name} (status or incoming)")
        row = doc.summary()
        if args.json:
            print(json.dumps(row, indent=2, sort_keys=True))
            return EXIT_OK
        print(view.detail(doc, now, settings.max_attempts, colour=colour))
        if row.get("approvals"):
            print(_approvals_text(row))
        return EXIT_OK
    only_docs = args.state not in (None, view.WAITING)
    docs = store.iter_statuses(args.state if only_docs else None)
    waiting = [] if only_docs else store.list_incoming_items()
    listed = view.rows(docs, waiting, state=args.state)
    if args.json:
        print(json.dumps([r.to_json() for r in listed], indent=2, sort_keys=True))
        return EXIT_OK
    print(view.table(listed, now, settings.max_attempts, colour=colour))
    return EXIT_OK


def _approvals_text(row: dict[str, Any]) -> str:
    """``byok status NAME``: the approvals given, refused and missing."""
    a = row["approvals"]
    lines = [
        f"approvals: {len(a['given'])} of {a['required']} required from group {a['group']!r}"
        + (f", {a['missing']} missing" if a["missing"] else ", complete")
    ]
    lines += [
        f"  given:   {g['approver_id']} (key {g['spki_sha256'][:16]}..., signed {g['signed_at']})"
        for g in a["given"]
    ]
    lines += [f"  refused: {r['file']}: [{r['reason']}] {r['message']}" for r in a["refused"]]
    if a["missing"]:
        lines.append(f"  waiting for: {', '.join(a['waiting_for'])}")
        if row.get("approval_deadline"):
            lines.append(
                f"  deadline: {row['approval_deadline']} (then rejected: approval_expired)"
            )
    if row.get("policy_sha256"):
        lines.append(f"policy sha256: {row['policy_sha256']}")
    return "\n".join(lines)


def cmd_watch(args: argparse.Namespace) -> int:
    """Deliver what waits in incoming like the platform does; exit 1 when a package ended
    failed or is still waiting (not for approval)."""
    from byok_pipeline.cli import status_view as view
    from byok_pipeline.processing.processor import Outcome
    from byok_pipeline.processing.watch import run_forever, watch

    settings = _settings(args)
    deps = _deps(settings)

    colour = view.use_colour(sys.stdout)
    failed: list[str] = []

    def report(name: str, outcome: Outcome | None, exc: Exception | None) -> None:
        now = datetime.now(UTC)
        if outcome is not None and outcome.state in ("failed", "verification_failed"):
            failed.append(name)
        if args.json:
            row: dict[str, Any] = {"blob_name": name, "time": now.isoformat()}
            if outcome is not None:
                row |= {"state": outcome.state, "reason_code": outcome.reason_code}
            else:
                row |= {"state": "retry", "reason_code": getattr(exc, "reason", None)}
            print(json.dumps(row), flush=True)
            return
        if outcome is not None:
            print(view.watch_outcome(name, outcome.state, outcome.reason_code, now, colour=colour),
                  flush=True)  # fmt: skip
            return
        throttled = isinstance(exc, TransientError) and exc.throttled
        wait = getattr(exc, "retry_after", None)
        doc = None
        with contextlib.suppress(PipelineError, ConfigError):  # the line goes without the tally
            doc = deps.store.status_by_name(name)
        print(
            view.watch_retry(
                name,
                str(exc),
                now,
                attempt=doc.attempts if doc is not None else None,
                max_attempts=settings.max_attempts,
                next_try=now + timedelta(seconds=wait if wait is not None else args.interval),
                throttled=throttled,
            ),
            flush=True,
        )

    if args.once:
        stats = watch(deps, once=True, interval=args.interval, workers=args.workers, report=report)
    else:
        print(f"watching {settings.incoming_container} (Ctrl-C to stop)", file=sys.stderr)
        run_forever(deps, interval=args.interval, workers=args.workers, report=report)
        raise KeyboardInterrupt  # it returns on Ctrl-C only: end as every command does (130)
    # packages awaiting approval are settled until people act; anything else left is not
    left = set(deps.store.list_incoming()) - stats.awaiting
    if not args.json:
        print(view.watch_summary(stats.outcomes, stats.redeliveries, len(left)), file=sys.stderr)
    return EXIT_OK if not left and not failed else EXIT_FAILED


def cmd_dev(args: argparse.Namespace) -> int:
    from byok_pipeline.localdev import stack as localdev

    directory = Path(args.dir)
    if args.dev_command == "up":
        result = localdev.up(directory)
        _out(
            args,
            result,
            f"local stack up: HSM {result['env']['BYOK_HSM_URL']}, "
            f"storage {result['env']['BYOK_STORAGE'].split('BlobEndpoint=')[1].rstrip(';')}\n"
            f"  source {result['env_file']}",
        )
    else:
        result = localdev.down(directory)
        _out(args, result, f"stopped: {', '.join(result['stopped']) or 'nothing was running'}")
    return EXIT_OK


def cmd_reconcile(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from byok_pipeline.processing.reconcile import reconcile

    report = reconcile(_deps(_settings(args)))
    _out(
        args,
        asdict(report),
        f"audit records completed: {report.audits_completed}; "
        f"redelivered: {report.redelivered or 'none'}; errors: {report.errors}",
    )
    return EXIT_OK if not report.errors else EXIT_FAILED


def cmd_reasons(args: argparse.Namespace) -> int:
    """The pipeline's reason codes, then the ``byok`` command's own."""
    if args.json:
        print(json.dumps({**REASONS, **CLI_REASONS}, indent=2))
    else:
        for code, text in REASONS.items():
            print(f"{code:28} {text}")
        print("\nthe byok command's own (never a package's outcome):")
        for code, text in CLI_REASONS.items():
            print(f"{code:28} {text}")
    return EXIT_OK


def _sdk_failure(exc: Exception, what: str) -> int:
    from azure.core.exceptions import AzureError

    from byok_pipeline.adapters.keyvault import translate

    if isinstance(exc, AzureError):
        err = translate(exc, what)
        raise err from None
    raise exc


# -- parser ---------------------------------------------------------------------------------------
def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _add_kek_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """``byok kek create|download|attest``."""
    kek = sub.add_parser("kek", help="create or download a Key Exchange Key, or its attestation")
    kek_sub = kek.add_subparsers(dest="kek_command", required=True)
    kc = kek_sub.add_parser(
        "create", parents=[common], help="create an import-only RSA-HSM KEK; prints its kid"
    )
    kc.add_argument("--name", required=True, help="key name (1-127 of 0-9 a-z A-Z -)")
    kc.add_argument(
        "--size", type=int, choices=[2048, 3072, 4096], default=4096, help="RSA size (default 4096)"
    )
    kc.add_argument(
        "--expires-days",
        type=_positive,
        metavar="N",
        help="KEK expires N (>= 1) days from now; recommended: short (default: no expiry)",
    )
    kc.add_argument(
        "--new-version",
        action="store_true",
        help="add a version to an existing key of that name (default: refuse)",
    )
    which = CliParser(add_help=False)  # the KEK that download and attest read
    which.add_argument("--kid", help="the KEK's kid with version (default: $BYOK_KEK_KID)")
    which.add_argument("--name", help="or the KEK's name (its latest version)")
    kd = kek_sub.add_parser(
        "download",
        parents=[common, which],
        help="write the KEK public PEM; print kid and SPKI SHA-256",
    )
    kd.add_argument("--out", required=True, metavar="KEK.pem")
    kd.add_argument(
        "--attestation",
        metavar="FILE",
        help="also save the KEK's attestation (the HSM's JSON, verified offline with "
        "byok-package verify-kek-attestation or wrap --kek-attestation)",
    )
    kd.add_argument("--force", action="store_true", help="replace existing files")
    ka = kek_sub.add_parser(
        "attest",
        parents=[common, which],
        help="save the KEK's attestation (the HSM's JSON); prints its SHA-256",
    )
    ka.add_argument("--out", required=True, metavar="FILE", dest="attestation")
    ka.add_argument("--force", action="store_true", help="replace an existing file")


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _add_drop_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """``byok drop DIR``."""
    dr = sub.add_parser(
        "drop",
        parents=[common],
        help="upload each complete NAME.byok put into a folder, through the upload gate",
    )
    dr.add_argument("folder", metavar="DIR", help="the folder the packages are put into")
    dr.add_argument("--once", action="store_true", help="take what is complete now, then exit")
    dr.add_argument(
        "--interval",
        type=_positive_seconds,
        default=2.0,
        metavar="SECONDS",
        help="seconds between polls; a file without a marker is complete when its size and "
        "time are the same at two polls in a row (default 2)",
    )
    dr.add_argument(
        "--done-marker",
        action="store_true",
        help="take NAME.byok only once NAME.byok.done exists (default: the marker, or a "
        "stable size and time)",
    )
    dr.add_argument("--uploader", help="who uploads, recorded in the audit (default: user@host)")
    dr.add_argument(
        "--new-version",
        action="store_true",
        help="as byok upload: a key name that exists gets the package as its next version",
    )
    dr.add_argument(
        "--force-offline",
        action="store_true",
        help="as byok upload: skip the checks against the HSM and the import policy",
    )


def build_parser() -> argparse.ArgumentParser:
    common = CliParser(add_help=False)
    common.add_argument("--hsm-url", help="Managed HSM URL (default: $BYOK_HSM_URL)")
    add_storage_option(common)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--verbose", action="store_true", help="on an error, also show its causes")

    parser = CliParser(
        prog="byok",
        description="Connected side of BYOK into Azure Managed HSM. Settings come from the "
        "environment (see README); `byok dev up` writes them for a local stack. "
        "Exit codes: 0 ok, 1 failed (reason code on stderr), 2 refused or usage error, "
        "130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"byok {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_kek_parsers(sub, common)

    up = sub.add_parser(
        "upload", parents=[common], help="drop a package into the incoming container"
    )
    up.add_argument("package", metavar="NAME.byok")
    up.add_argument("--manifest", help="its manifest (default: NAME.manifest.json beside it)")
    up.add_argument(
        "--no-manifest", action="store_true", help="do not pick up a manifest beside it"
    )
    up.add_argument("--name", help="blob name (default: the file name)")
    up.add_argument("--uploader", help="who uploads, recorded in the audit (default: user@host)")
    up.add_argument(
        "--new-version",
        action="store_true",
        help="the key name exists in the HSM: make this package its next version (the import "
        "policy must allow it; default: refuse)",
    )
    up.add_argument(
        "--force-offline",
        action="store_true",
        help="skip the checks against the HSM and the import policy (the local checks stay; "
        "the pipeline checks everything again)",
    )
    up.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="tag for the imported key version (repeatable, at most 10)",
    )

    _add_drop_parser(sub, common)

    im = sub.add_parser(
        "import",
        parents=[common],
        help="validate, import and verify directly, without a blob drop (audited); safe to repeat",
    )
    im.add_argument("package", metavar="NAME.byok")
    im.add_argument("--manifest", help="its manifest (default: NAME.manifest.json beside it)")
    im.add_argument(
        "--no-manifest", action="store_true", help="do not pick up a manifest beside it"
    )
    im.add_argument("--name", help="key name (default: NAME from the file name)")
    im.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="tag for the imported version",
    )

    st = sub.add_parser("status", parents=[common], help="status of one package or all")
    st.add_argument("name", nargs="?", help="blob name, e.g. payments.byok")
    st.add_argument(
        "--state",
        choices=_status_states(),
        metavar="STATE",
        help="only this state: " + ", ".join(_status_states()),
    )

    wa = sub.add_parser(
        "watch", parents=[common], help="local runner: deliver dropped packages like Event Grid"
    )
    wa.add_argument("--once", action="store_true", help="process what is there, then exit")
    wa.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default 2)")
    wa.add_argument(
        "--workers", type=_positive, default=1, help="concurrent deliveries (default 1)"
    )

    dev = sub.add_parser("dev", help="start/stop a local stack (Azurite + Managed HSM emulator)")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    for name, text in (("up", "start it and write DIR/env"), ("down", "stop it")):
        p = dev_sub.add_parser(name, help=text)
        p.add_argument("--dir", default=".byok-dev", help="state directory (default .byok-dev)")
        p.add_argument("--json", action="store_true")

    sub.add_parser(
        "reconcile",
        parents=[common],
        help="complete missing audit records; redeliver packages whose events were lost",
    )
    rs = sub.add_parser("reasons", help="list the reason codes")
    rs.add_argument("--json", action="store_true")
    add_audit_parser(sub, common)
    add_authorization_parsers(sub, common)
    add_serve_parser(sub, common)
    return parser


def _authz(settings: Settings) -> Any:
    from byok_pipeline.adapters.authorization_store import AuthorizationStore

    return AuthorizationStore(_store(settings).service, settings)


def cmd_policy(args: argparse.Namespace) -> int:
    from byok_pipeline.cli.authorization import cmd_policy as run

    if args.policy_command == "validate":
        return run(args, store=lambda: None, audit=lambda _: None, out=_out)
    settings = _settings(args, require_hsm=False)
    sink = _audit_sink(settings) if args.policy_command == "set" else None
    return run(
        args,
        store=lambda: _authz(settings),
        audit=lambda event: _audit(sink, event),
        out=_out,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """``byok serve``: the dashboard and the Function's HTTP routes, read-only."""
    from byok_pipeline.cli.serve import ReadOnlyAudit
    from byok_pipeline.cli.serve import cmd_serve as run
    from byok_pipeline.processing.processor import Deps

    settings = _settings(args)
    deps = Deps(
        settings=settings, store=_store(settings), hsm=_hsm(settings), audit=ReadOnlyAudit()
    )
    return run(args, settings=settings, deps=deps)


def cmd_approve(args: argparse.Namespace) -> int:
    from byok_pipeline.cli.authorization import cmd_approve as run

    settings = _settings(args, require_hsm=False)
    return run(args, store=lambda: _authz(settings), out=_out)


_COMMANDS = {
    "policy": cmd_policy,
    "approve": cmd_approve,
    "upload": cmd_upload,
    "drop": cmd_drop,
    "import": cmd_import,
    "status": cmd_status,
    "watch": cmd_watch,
    "dev": cmd_dev,
    "reasons": cmd_reasons,
    "audit": cmd_audit,
    "reconcile": cmd_reconcile,
    "serve": cmd_serve,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``byok``: every ending is an exit code and one line (:func:`failures.run`)."""
    return run(argv, build_parser, _dispatch)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "kek":
        if args.kek_command == "create":
            return cmd_kek_create(args)
        return cmd_kek_download(args)  # download, or attest (the attestation alone)
    if args.command == "audit" and args.audit_command == "init":
        from byok_pipeline.cli.audit_init import cmd_init

        return cmd_init(args, hsm=_hsm(_settings(args)), out=_out)
    return _COMMANDS[args.command](args)
