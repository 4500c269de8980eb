"""``byok-package``: the air-gapped packager's command line.

Exit codes (:mod:`.cli_exit`): 0 success; 2 refused (a one-line reason on stderr, no file
written) or a usage error; 130 interrupted (Ctrl-C: nothing partial is left); 141 the output's
reader went away (``| head``). ``wrap-batch`` (:mod:`.cli_batch`): 0 every key wrapped; 2 any
key, or the batch, refused; 130 interrupted. Modules only some commands need (approvals, attestation, package checks, PKCS#11,
the batch) are imported by those commands, so a plain ``wrap`` starts faster.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import TOOL_NAME, __version__, cli_batch
from .atomic import check_writable, write_files_atomically
from .cli_common import (
    Clock,
    add_attestation_options,
    add_kek_options,
    add_pkcs11_options,
    env_secret,
    kek_context,
    load_kek,
    read_file,
    verify_attestation,
    warn,
)
from .cli_exit import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    CliParser,
    UsageError,
    ending,
    one_line,
    usage_error,
)
from .errors import ApprovalError, AttestationError, ByokError, OutputError
from .kek import Kek, load_kek_pem
from .keytypes import TARGET_TYPES, TYPE_NAMES
from .kid import KEY_NAME_RE, parse_kid
from .manifest import parse_manifest
from .package_format import load_json_strict
from .packager import (
    KekContext,
    Outputs,
    Wrapped,
    key_name_from_output,
    package_facts,
    resolve_key_ops,
    wrap_software,
    write_package,
)
from .target_keys import generate_target, load_target

if TYPE_CHECKING:  # imported where used: a plain `wrap` starts without x509 and JWS code
    from .approval import ApprovalClaims, ApprovalSigner, Approver
    from .checks import PackageReport

DEFAULT_VALID_DAYS = 7
MAX_VALID_DAYS = 366
_MAX_APPROVALS_LISTED = 100

_WRAP_EPILOG = """\
examples:
  byok-package wrap --kek KEK.pem --kek-kid https://HSM.managedhsm.azure.net/keys/KEK/VERSION \\
      --kek-sha256 HEX --key payments.pem --out payments.byok
  byok-package wrap ... --key aes.bin --key-type oct --key-ops encrypt,decrypt --out aes.byok
  byok-package wrap ... --pkcs11-module /usr/lib/softhsm/libsofthsm2.so --token-label T \\
      --pin-env TOKEN_PIN --key-label signing-key --out signing-key.byok

--generate makes a key in this process's memory and never writes its private part anywhere:
it is for tests and demos. In production the key comes from --key (a file held by the custodian)
or from an HSM (--pkcs11-module), where the plaintext never leaves the token.
Writes NAME.byok and NAME.manifest.json atomically; refuses to overwrite without --force.
"""


_VERIFY_EPILOG = """\
checks, with no network:
  the certificates chain to a pinned Marvell LiquidSecurity root (LS1 or LS2; see
  offline_packager/roots/README.md), the blob's signature verifies under the partition
  certificate, the attested RSA key is exactly the KEK PEM (SubjectPublicKeyInfo), and the
  attested attributes say: generated in the HSM, not extractable. Anything not understood is
  refused (attestation_format_unsupported). Format and sources: docs/kek-attestation.md.

examples:
  byok-package verify-kek-attestation KEK.attestation.json --kek KEK.pem --kek-kid KID
  byok-package verify-kek-attestation KEK.attestation.json --kek KEK.pem \\
      --trust-test-root .byok-dev/hsm/attestation-test-root.pem     # the emulator's only
"""


_APPROVE_EPILOG = """\
what you sign:
  The approval is a detached JWS signature over the manifest's exact bytes. Its protected
  header binds your approver id, the key name, the package's and the manifest's SHA-256 and a
  validity window. Before signing, this command prints the facts you approve: key name,
  package SHA-256, target type and fingerprint, KEK kid and SPKI SHA-256, key operations and
  not-after. Compare them with what the custodian and the requester told you (out of band).
  If anything differs, delete the approval file: it is only effective once it is carried to the
  connected side, beside the package.

examples:
  byok-package approve payments.manifest.json --approver-id alice \\
      --signer-key alice.key.pem --passphrase-env ALICE_PASS --out payments.approval-alice.json
  byok-package approve payments.manifest.json --approver-id bob --valid-days 2 \\
      --pkcs11-module /usr/lib/softhsm/libsofthsm2.so --token-label bob-card \\
      --pin-env BOB_PIN --key-label approval-key --out payments.approval-bob.json

Writes the approval atomically and never replaces an existing file. Format, ceremony and an
auditor's check with the OpenSSL CLI alone: docs/approvals.md.
"""


def _load_manifest(data: bytes) -> dict[str, Any]:
    """A manifest read back, strictly.

    Raises:
        ByokError: ``malformed_package`` (not strict JSON), ``bad_manifest``.
    """
    try:
        doc = load_json_strict(data, what="manifest")
    except ValueError:  # e.g. an integer over Python's 4300-digit limit
        raise ByokError("the manifest is not acceptable JSON", reason="malformed_package") from None
    return parse_manifest(doc)


def _attestation_lines(att: dict[str, Any]) -> str:
    """Human lines for a verified attestation (its manifest record)."""
    attrs = att["attributes"]
    test = " (a TEST root: emulator only)" if att["trust_anchor"] == "test-root" else ""
    return (
        f"  KEK attestation verified: chain to {att['trust_anchor']}{test}, root SHA-256 "
        f"{att['trust_anchor_sha256']}\n"
        f"    attested key {att['attested_key_id'] or '(no key id in the attestation)'}\n"
        f"    generated in the HSM: {attrs['local']}, extractable: {attrs['extractable']}\n"
        f"    attestation SHA-256 {att['sha256']}"
    )


def cmd_wrap(args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    """Wrap one target key into NAME.byok + NAME.manifest.json."""
    outputs = Outputs.for_package(Path(args.out), Path(args.manifest) if args.manifest else None)
    check_writable([outputs.package, outputs.manifest], force=args.force)
    ctx = kek_context(args, clock)
    wrapped = _wrap_in_token(args, ctx) if args.pkcs11_module else _wrap_in_memory(args, ctx)
    built = write_package(ctx, outputs, wrapped, created=clock(), force=args.force)
    return {
        "status": "ok",
        **package_facts(outputs, wrapped, built),
        "kek_kid": ctx.kid.kid,
        "kek_spki_sha256": ctx.kek.fingerprint,
        "kek_attestation": ctx.attestation,
    }


def _wrap_in_token(args: argparse.Namespace, ctx: KekContext) -> Wrapped:
    """HSM mode: the target found (or generated) in the token and wrapped there.

    Raises:
        ByokError: ``bad_arguments``, ``bad_key_ops``; the token's reasons (Pkcs11Error) and
            ``unsupported_target``/``unsupported_curve``.
    """
    from .pkcs11_source import TokenRequest, wrap_in_token

    if not args.token_label or not args.key_label:
        raise ByokError("HSM mode needs --token-label and --key-label", reason="bad_arguments")
    if args.key or args.key_type:
        raise ByokError(
            "--key/--key-type cannot be used with --pkcs11-module", reason="bad_arguments"
        )
    request = TokenRequest(
        module=args.pkcs11_module,
        token_label=args.token_label,
        pin=env_secret(args.pin_env, "token user PIN"),
        key_label=args.key_label,
        generate=args.generate,
    )
    if args.generate:
        resolve_key_ops(TARGET_TYPES[args.generate], args.key_ops)
    result = wrap_in_token(request, kek=ctx.kek)
    for warning in result.warnings:
        warn(warning)
    key_ops = resolve_key_ops(result.target.type, args.key_ops)
    return Wrapped(result.ciphertext, result.target, key_ops, dict(result.key_source))


def _wrap_in_memory(args: argparse.Namespace, ctx: KekContext) -> Wrapped:
    """Software mode: the target read from ``--key`` or generated, wrapped in this process.

    Raises:
        ByokError: ``bad_arguments``, ``unreadable_input``, ``bad_key_ops``; the key file's
            reasons (TargetKeyError).
    """
    if args.key_label or args.token_label:
        raise ByokError("--key-label/--token-label need --pkcs11-module", reason="bad_arguments")
    if args.generate:
        key = generate_target(args.generate)
        source = {"kind": "software-generated"}
    elif args.key:
        key = load_target(
            read_file(args.key, "key file"),
            key_type=args.key_type,
            passphrase=env_secret(args.passphrase_env, "key passphrase"),
        )
        source = {"kind": "software-file"}
    else:
        raise ByokError(
            "give --key FILE, --generate TYPE or --pkcs11-module", reason="bad_arguments"
        )
    return wrap_software(ctx.kek, key, key_ops=args.key_ops, key_source=source)


def cmd_verify_attestation(args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    """Verify a KEK attestation file against the KEK PEM, offline."""
    kek = load_kek(args)
    kek_kid = parse_kid(args.kek_kid) if args.kek_kid else None
    result = verify_attestation(args, kek, kek_kid, clock)
    return {
        "status": "verified",
        "attestation": args.kek_attestation,
        "kek": args.kek,
        "kek_kid": kek_kid.kid if kek_kid else None,
        "kek_spki_sha256": kek.fingerprint,
        **result.to_manifest(),
    }


def _approval_not_after(args: argparse.Namespace, now: datetime) -> datetime:
    from .approval import parse_time

    if args.not_after is not None:
        not_after = parse_time(args.not_after, "--not-after", reason="bad_arguments")
        if not_after <= now:
            raise ByokError(
                f"--not-after {args.not_after} is not in the future", reason="bad_arguments"
            )
        return not_after
    days = DEFAULT_VALID_DAYS if args.valid_days is None else args.valid_days
    if not 1 <= days <= MAX_VALID_DAYS:
        raise ByokError(f"--valid-days must be 1 to {MAX_VALID_DAYS}", reason="bad_arguments")
    return now + timedelta(days=days)


def _approval_facts(
    manifest_path: Path, manifest: dict[str, Any], manifest_bytes: bytes, key_name: str
) -> dict[str, Any]:
    """What the approver approves, read from the manifest (and the package beside it)."""
    package, target, kek = manifest["package"], manifest["target"], manifest["kek"]
    file_name = package.get("file_name")
    facts: dict[str, Any] = {
        "key_name": key_name,
        "manifest": str(manifest_path),
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "package_file": file_name,
        "package_sha256": package.get("sha256"),
        "target_type": target.get("type"),
        "fingerprint": target.get("fingerprint"),
        "key_ops": target.get("key_ops"),
        "kek_kid": kek.get("kid"),
        "kek_spki_sha256": kek.get("spki_sha256"),
        "kek_attestation": kek.get("attestation"),
        "created": manifest.get("created"),
        "package_checked": False,
    }
    if isinstance(file_name, str) and Path(file_name).name == file_name:
        beside = manifest_path.parent / file_name
        if beside.is_file():
            actual = hashlib.sha256(read_file(str(beside), "package")).hexdigest()
            if actual != package.get("sha256"):
                raise ApprovalError(
                    f"the package beside the manifest ({beside}) has SHA-256 {actual}, the "
                    f"manifest says {package.get('sha256')}: do not approve",
                    reason="approval_wrong_package",
                )
            facts["package_checked"] = True
    return facts


def _print_facts(facts: dict[str, Any], approver_id: str, not_after: datetime) -> None:
    from .approval import format_time

    fp = facts["fingerprint"] or {}
    checked = (
        "matches the package file beside the manifest"
        if facts["package_checked"]
        else "package file not found beside the manifest: not checked"
    )
    ops = facts["key_ops"]
    print(f"approval by {approver_id} of:")
    print(f"  key name:          {facts['key_name']}")
    print(f"  package:           {facts['package_file']}")
    print(f"  package SHA-256:   {facts['package_sha256']} ({checked})")
    print(f"  manifest SHA-256:  {facts['manifest_sha256']}")
    print(f"  target:            {facts['target_type']}, {fp.get('kind')} {fp.get('value')}")
    print(f"  KEK:               {facts['kek_kid']}")
    print(f"  KEK SPKI SHA-256:  {facts['kek_spki_sha256']}")
    att = facts["kek_attestation"]
    if isinstance(att, dict):
        print(
            f"  KEK attestation:   {att.get('result')} at wrap time, chain to "
            f"{att.get('trust_anchor')}, SHA-256 {att.get('sha256')}"
        )
    else:
        print("  KEK attestation:   none (nothing proves the KEK lives in the HSM)")
    print(f"  key ops:           {','.join(ops) if isinstance(ops, list) else ops}")
    print(f"  wrapped at:        {facts['created']}")
    print(f"  not after:         {format_time(not_after)}")
    sys.stdout.flush()


def _check_approve_args(args: argparse.Namespace) -> bool:
    """Refuse contradictory signer options; True for a token signer.

    Raises:
        ByokError: ``bad_arguments``.
    """
    from .approval import APPROVER_ID_RE

    if not APPROVER_ID_RE.fullmatch(args.approver_id):
        raise ByokError(
            "--approver-id must match ^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$",
            reason="bad_arguments",
        )
    hsm = bool(args.pkcs11_module)
    if hsm and args.signer_key:
        raise ByokError("give --signer-key or --pkcs11-module, not both", reason="bad_arguments")
    if hsm and (not args.token_label or not args.key_label):
        raise ByokError(
            "a token signer needs --token-label and --key-label", reason="bad_arguments"
        )
    if not hsm and not args.signer_key:
        raise ByokError(
            "give --signer-key FILE or a token (--pkcs11-module ...)", reason="bad_arguments"
        )
    if not hsm and (args.token_label or args.key_label or args.pin_env):
        raise ByokError(
            "--token-label/--key-label/--pin-env need --pkcs11-module", reason="bad_arguments"
        )
    if hsm and args.passphrase_env:
        raise ByokError("--passphrase-env goes with --signer-key", reason="bad_arguments")
    return hsm


def _approval_key_name(args: argparse.Namespace, manifest: dict[str, Any]) -> str:
    """``--key-name``, else the manifest's package file name without ``.byok``.

    Raises:
        ByokError: ``bad_key_name``.
    """
    if args.key_name is not None:
        if not KEY_NAME_RE.fullmatch(args.key_name):
            raise ByokError("--key-name must be 1-127 of 0-9 a-z A-Z -", reason="bad_key_name")
        return str(args.key_name)
    file_name = manifest["package"].get("file_name")
    try:
        return key_name_from_output(Path(str(file_name)))
    except ByokError:
        raise ByokError(
            f"the manifest's package file name {file_name!r} is not NAME.byok: give --key-name",
            reason="bad_key_name",
        ) from None


def cmd_approve(args: argparse.Namespace, clock: Clock, *, as_json: bool) -> dict[str, Any]:
    """Sign an approval of a manifest (software key or PKCS#11 token) into ``--out``."""
    from .approval import format_time, load_signer_key, parse_approval, sign_approval

    out = Path(args.out)
    if out.exists():
        raise OutputError(
            f"{out} exists; an approval is never replaced: remove it or choose another --out"
        )
    check_writable([out], force=False)
    hsm = _check_approve_args(args)
    manifest_path = Path(args.manifest)
    manifest_bytes = read_file(args.manifest, "manifest")
    manifest = _load_manifest(manifest_bytes)
    key_name = _approval_key_name(args, manifest)
    now = clock()
    not_after = _approval_not_after(args, now)
    facts = _approval_facts(manifest_path, manifest, manifest_bytes, key_name)
    expected = f"{_package_stem(Path(str(facts['package_file'])))}.approval-{args.approver_id}.json"
    if out.name != expected:
        print(
            f"{TOOL_NAME}: warning: approvals are looked for as {expected} beside the package; "
            f"{out.name} will not be found there under that name",
            file=sys.stderr,
        )
    if not as_json:
        _print_facts(facts, args.approver_id, not_after)

    def sign(signer: ApprovalSigner) -> bytes:
        return sign_approval(
            manifest=manifest_bytes,
            approver_id=args.approver_id,
            key_name=key_name,
            not_after=not_after,
            signer=signer,
            now=now,
        )

    signer_kind: dict[str, str]
    if hsm:
        from .pkcs11_signer import TokenSignerRequest, token_signer

        request = TokenSignerRequest(
            module=args.pkcs11_module,
            token_label=args.token_label,
            pin=env_secret(args.pin_env, "token user PIN"),
            key_label=args.key_label,
        )
        with token_signer(request) as token_key:
            data = sign(token_key)
            signer_alg, signer_spki = token_key.alg, token_key.spki_sha256
            signer_kind = {
                "kind": "pkcs11",
                "token_label": args.token_label,
                "key_label": args.key_label,
                "mechanism": token_key.mechanism,
            }
    else:
        signer = load_signer_key(
            read_file(args.signer_key, "signer key", limit=64 * 1024),
            passphrase=env_secret(args.passphrase_env, "signer key passphrase"),
        )
        data = sign(signer)
        signer_alg, signer_spki = signer.alg, signer.spki_sha256
        signer_kind = {"kind": "software-file"}
    write_files_atomically([(out, data)], force=False)
    claims = parse_approval(data)
    return {
        "status": "ok",
        "approval": str(out),
        "approver_id": args.approver_id,
        **facts,
        "signed_at": format_time(claims.signed_at),
        "not_after": format_time(claims.not_after),
        "alg": signer_alg,
        "signer_spki_sha256": signer_spki,
        "signer": signer_kind,
    }


def _report_dict(path: str, report: PackageReport) -> dict[str, Any]:
    pkg = report.package
    return {
        "package": path,
        "valid": report.valid,
        "findings": [{"reason": f.reason, "message": f.message} for f in report.findings],
        "notes": report.notes,
        "kid": pkg.kid if pkg else None,
        "generator": pkg.generator if pkg else None,
        "ciphertext_bytes": len(pkg.ciphertext) if pkg else None,
        "kek_size": report.kek_size,
        "rsa_block_bytes": report.rsa_block_bytes,
        "kwp_bytes": report.kwp_bytes,
        "target_type": report.target_type.name if report.target_type else None,
        "target_type_inferred": report.target_type_inferred,
    }


def cmd_inspect(args: argparse.Namespace, clock: Clock) -> tuple[dict[str, Any], bool]:
    """Check a package offline; with a manifest, cross-check it too. List the approvals found
    beside it (``NAME.approval-*.json``); with ``--approvers``, verify each."""
    from .approval import load_approvers
    from .checks import check_package
    from .plaintext import refuse_plaintext_key

    data = read_file(args.package, "package", limit=1024 * 1024)
    refuse_plaintext_key(data, args.package, advice="keep it on this offline machine")
    kek = load_kek_pem(read_file(args.kek, "KEK file", limit=64 * 1024)) if args.kek else None
    manifest_path = (
        Path(args.manifest) if args.manifest else Path(args.package).with_suffix(".manifest.json")
    )
    manifest: dict[str, Any] | None = None
    manifest_bytes: bytes | None = None
    if args.manifest or manifest_path.is_file():
        manifest_bytes = read_file(str(manifest_path), "manifest")
        manifest = _load_manifest(manifest_bytes)
    approvers: dict[str, Approver] | None = None
    if args.approvers:
        approvers = load_approvers(read_file(args.approvers, "approvers file"))
        if manifest_bytes is None:
            raise ByokError(
                f"--approvers needs the package's manifest: {manifest_path} does not exist "
                "(approvals sign the manifest; give --manifest PATH)",
                reason="bad_arguments",
            )
    kek_kid = args.kek_kid or (manifest["kek"]["kid"] if manifest else None)
    stated = args.type or (manifest["target"]["type"] if manifest else None)
    report = check_package(data, kek=kek, kek_kid=kek_kid, stated_type=stated)
    if report.package is None:
        first = report.findings[0]
        raise NotAPackage(
            f"{args.package} is not a .byok package: {first.message}",
            reason=first.reason,
            findings=[{"reason": f.reason, "message": f.message} for f in report.findings],
        )
    attestation = _inspect_attestation(
        args, kek, kid_text=kek_kid, manifest=manifest, report=report, clock=clock
    )
    if manifest is not None:
        import hashlib

        if manifest["package"].get("sha256") != hashlib.sha256(data).hexdigest():
            report.add("manifest_mismatch", "the package's SHA-256 differs from its manifest's")
        if kek is not None and manifest["kek"].get("spki_sha256") != kek.fingerprint:
            report.add(
                "kek_mismatch", "the KEK file's SPKI SHA-256 differs from the manifest's KEK"
            )
    approvals = _inspect_approvals(Path(args.package), report, manifest_bytes, approvers, clock())
    result = _report_dict(args.package, report)
    result["manifest"] = str(manifest_path) if manifest is not None else None
    result["approvers_file"] = args.approvers
    result["kek_attestation"] = attestation
    result["approvals"] = approvals
    result["approved_by"] = sorted(
        {a["claims"]["kid"] for a in approvals if a["status"] == "valid"}
    )
    return result, report.valid


def _inspect_attestation(
    args: argparse.Namespace,
    kek: Kek | None,
    *,
    kid_text: str | None,
    manifest: dict[str, Any] | None,
    report: PackageReport,
    clock: Clock,
) -> dict[str, Any] | None:
    """With ``--kek-attestation``: verify it (a refusal is a finding) and compare it with the
    manifest's record. Without: the manifest's record, as written at wrap time."""
    recorded = manifest["kek"].get("attestation") if manifest else None
    if not args.kek_attestation:
        if args.trust_test_root:
            raise ByokError("--trust-test-root needs --kek-attestation", reason="bad_arguments")
        return {"status": "recorded", **recorded} if isinstance(recorded, dict) else None
    if kek is None:
        raise ByokError("--kek-attestation needs --kek KEK.pem", reason="bad_arguments")
    try:
        kek_kid = parse_kid(kid_text) if kid_text else None
        result = verify_attestation(args, kek, kek_kid, clock)
    except AttestationError as exc:
        report.add(exc.reason, exc.message)
        return {"status": "refused", "reason": exc.reason, "message": exc.message}
    if isinstance(recorded, dict) and recorded.get("sha256") != result.sha256:
        report.add(
            "manifest_mismatch",
            "the KEK attestation file is not the one the manifest records (SHA-256 differs)",
        )
    return {"status": "verified", **result.to_manifest()}


def _package_stem(package: Path) -> str:
    name = package.name
    return name[: -len(".byok")] if name.endswith(".byok") else package.stem


def approval_files(package: Path) -> list[Path]:
    """The approvals beside a package: ``NAME.approval-*.json`` in the package's folder."""
    import glob

    pattern = f"{glob.escape(_package_stem(package))}.approval-*.json"
    return sorted(p for p in package.parent.glob(pattern) if p.is_file())[:_MAX_APPROVALS_LISTED]


def _inspect_approvals(
    package: Path,
    report: PackageReport,
    manifest_bytes: bytes | None,
    approvers: dict[str, Approver] | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """Each approval's claims; verified when ``approvers`` is given. A refused approval is also
    a finding of the report (so inspect exits 2)."""
    from .approval import MAX_APPROVAL_BYTES, parse_approval, verify_approval

    key_name = _package_stem(package)
    package_sha = hashlib.sha256(package.read_bytes()).hexdigest() if package.is_file() else None
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest() if manifest_bytes else None
    entries: list[dict[str, Any]] = []
    for path in approval_files(package):
        entry: dict[str, Any] = {
            "file": str(path),
            "status": "unverified",
            "reason": None,
            "message": None,
            "claims": None,
        }
        try:
            data = read_file(str(path), "approval", limit=MAX_APPROVAL_BYTES + 1)
            claims = parse_approval(data)
            entry["claims"] = claims.as_dict()
            if approvers is not None and manifest_bytes is not None:
                _check_approval_target(claims, key_name, package_sha, manifest_sha)
                approver = _approver_of(claims, approvers)
                verify_approval(data, manifest=manifest_bytes, approver=approver, now=now)
                entry["status"] = "valid"
        except ByokError as exc:
            entry.update(status="refused", reason=exc.reason, message=exc.message)
            report.add(exc.reason, f"{path.name}: {exc.message}")
        entries.append(entry)
    return entries


def _print_inspect(result: dict[str, Any]) -> None:
    print(f"package:      {result['package']}")
    print(f"kid:          {result['kid']}")
    print(f"generator:    {result['generator']}")
    print(
        f"ciphertext:   {result['ciphertext_bytes']} bytes "
        f"(RSA block {result['rsa_block_bytes']}, AES-KWP {result['kwp_bytes']})"
    )
    print(f"KEK size:     {result['kek_size']}")
    inferred = " (inferred from length)" if result["target_type_inferred"] else ""
    print(f"target type:  {result['target_type']}{inferred}")
    if result["manifest"]:
        print(f"manifest:     {result['manifest']}")
    for note in result["notes"]:
        print(f"note:         {note}")
    att = result.get("kek_attestation")
    if att:
        if att["status"] == "refused":
            print(f"KEK attest.:  REFUSED [{att['reason']}]")
        else:
            print(
                f"KEK attest.:  {att['status']}, chain to {att['trust_anchor']}, "
                f"SHA-256 {att['sha256']}"
            )
    _print_approvals(result)
    if result["valid"]:
        print("result:       VALID")
    else:
        print("result:       INVALID")
        for f in result["findings"]:
            print(f"  - [{f['reason']}] {f['message']}")


def _approver_of(claims: ApprovalClaims, approvers: dict[str, Approver]) -> Approver:
    """The approver the approval names.

    Raises:
        ByokError: ``approval_unknown_approver``.
    """
    approver = approvers.get(claims.approver_id)
    if approver is None:
        raise ByokError(
            f"approver {claims.approver_id!r} is not in the approvers file",
            reason="approval_unknown_approver",
        )
    return approver


def _check_approval_target(
    claims: ApprovalClaims, key_name: str, package_sha: str | None, manifest_sha: str | None
) -> None:
    """What the (not yet verified) header says it approves, against this package: a mismatch
    is a clearer answer than the signature failure it would otherwise become. The connected
    side checks in the same order.

    Raises:
        ApprovalError: ``approval_wrong_package``.
    """
    if claims.key_name != key_name:
        raise ApprovalError(
            f"the approval is for key {claims.key_name!r}; this package imports {key_name!r}",
            reason="approval_wrong_package",
        )
    if claims.package_sha256 != package_sha:
        raise ApprovalError(
            "the approval is for another package (byok_package_sha256 differs)",
            reason="approval_wrong_package",
        )
    if claims.manifest_sha256 != manifest_sha:
        raise ApprovalError(
            "the approval signs another manifest (byok_manifest_sha256 differs)",
            reason="approval_wrong_package",
        )


def _print_approvals(result: dict[str, Any]) -> None:
    approvals = result["approvals"]
    if not approvals:
        print("approvals:    none beside the package")
        return
    if result["approvers_file"]:
        valid = result["approved_by"]
        print(
            f"approvals:    {len(approvals)} found, verified against {result['approvers_file']}: "
            f"{len(valid)} valid ({', '.join(valid) or 'none'})"
        )
    else:
        print(f"approvals:    {len(approvals)} found, not verified (give --approvers FILE)")
    for entry in approvals:
        claims = entry["claims"]
        status = entry["status"]
        if status == "refused":
            status = f"refused [{entry['reason']}]: {entry['message']}"
        print(f"  - {Path(entry['file']).name}: {status}")
        if claims:
            print(
                f"      {claims['kid']} approves key {claims['byok_key_name']}, package SHA-256 "
                f"{claims['byok_package_sha256']}"
            )
            print(
                f"      {claims['alg']}, signed {claims['byok_signed_at']}, not after "
                f"{claims['byok_not_after']}"
            )


def cmd_types() -> dict[str, Any]:
    return {
        "types": [
            {
                "type": t.name,
                "kty": t.kty,
                "key_size": t.key_size,
                "crv": t.crv,
                "default_key_ops": list(t.default_key_ops),
            }
            for t in TARGET_TYPES.values()
        ]
    }


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog=TOOL_NAME,
        description="Air-gapped packager: wrap a target key under a Managed HSM KEK into a .byok "
        "file (CKM_RSA_AES_KEY_WRAP), sign import approvals (dual control) and inspect "
        "packages and their approvals offline. Exit codes: 0 ok, "
        "2 refused (reason on stderr), 1 failure.",
    )
    parser.add_argument("--version", action="version", version=f"{TOOL_NAME} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser(
        "wrap",
        help="wrap a target key into NAME.byok + NAME.manifest.json",
        epilog=_WRAP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_kek_options(w)
    src = w.add_mutually_exclusive_group()
    src.add_argument(
        "--generate",
        choices=TYPE_NAMES,
        metavar="TYPE",
        help="generate the target (tests/demos; in the token with --pkcs11-module): "
        + ", ".join(TYPE_NAMES),
    )
    src.add_argument(
        "--key",
        metavar="FILE",
        help="target key: PEM/DER (PKCS#8, PKCS#1, SEC1), JWK JSON, "
        "or raw AES bytes with --key-type oct",
    )
    w.add_argument(
        "--key-type", choices=["oct"], help="read --key as raw AES key bytes (16, 24 or 32)"
    )
    w.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="environment variable holding the PEM passphrase (else prompt)",
    )
    w.add_argument(
        "--key-ops",
        metavar="OPS",
        help="comma-separated key operations for the imported key (default per family)",
    )
    w.add_argument(
        "--out",
        required=True,
        metavar="NAME.byok",
        help="output package; NAME is the key name to import",
    )
    w.add_argument(
        "--manifest", metavar="PATH", help="manifest path (default NAME.manifest.json beside --out)"
    )
    add_attestation_options(w)
    w.add_argument("--force", action="store_true", help="replace existing output files")
    w.add_argument("--json", action="store_true", help="print a JSON result on stdout")
    add_pkcs11_options(
        w.add_argument_group("HSM mode (PKCS#11)"),
        key_label_help="label of the target key in the token (found, or created with --generate)",
    )

    cli_batch.add_parser(sub)

    i = sub.add_parser("inspect", help="check a .byok package offline, without any secret")
    i.add_argument("package", metavar="NAME.byok")
    i.add_argument(
        "--kek", metavar="KEK.pem", help="KEK public key: enables modulus and fingerprint checks"
    )
    i.add_argument("--kek-kid", metavar="KID", help="expected KEK kid (default: from the manifest)")
    i.add_argument(
        "--type",
        choices=TYPE_NAMES,
        help="stated target type (default: from the manifest, else inferred)",
    )
    i.add_argument(
        "--manifest",
        metavar="PATH",
        help="manifest (default NAME.manifest.json beside the package, if present)",
    )
    i.add_argument(
        "--approvers",
        metavar="FILE",
        help="verify the approvals beside the package (NAME.approval-*.json) against this "
        'approvers file ({"approvers": [{"id", "public_key_pem", "expires"?}]}); needs the '
        "manifest; without it the approvals are listed unverified",
    )
    add_attestation_options(i)
    i.add_argument("--json", action="store_true", help="print the report as JSON")

    v = sub.add_parser(
        "verify-kek-attestation",
        help="verify a KEK's attestation (byok kek attest) against its PEM, offline",
        epilog=_VERIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument("kek_attestation", metavar="ATTESTATION.json")
    v.add_argument("--kek", required=True, metavar="KEK.pem", help="the KEK public key (PEM)")
    v.add_argument("--kek-kid", metavar="KID", help="the KEK's kid: the attestation must name it")
    v.add_argument(
        "--kek-sha256", metavar="HEX", help="SHA-256 of the KEK's SPKI as shown when downloaded"
    )
    v.add_argument(
        "--trust-test-root",
        metavar="FILE",
        help="also trust this TEST root (the emulator's attestation-test-root.pem); never in "
        "production",
    )
    v.add_argument("--json", action="store_true", help="print a JSON result on stdout")

    a = sub.add_parser(
        "approve",
        help="sign an approval of a package (dual control: NAME.approval-ID.json)",
        description="Sign a detached approval of NAME.manifest.json (and so of NAME.byok) as\n"
        "one approver. The connected side imports a package only with the approvals its\n"
        "policy requires (dual control: M of N approvers).",
        epilog=_APPROVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a.add_argument(
        "manifest",
        metavar="NAME.manifest.json",
        help="the manifest written by `byok-package wrap`; the approval signs its exact bytes",
    )
    a.add_argument(
        "--approver-id",
        required=True,
        metavar="ID",
        help="your approver id, as listed in the approvers file of the connected side",
    )
    a.add_argument(
        "--key-name",
        metavar="NAME",
        help="the Managed HSM key name you approve (default: the package file name without .byok)",
    )
    validity = a.add_mutually_exclusive_group()
    validity.add_argument(
        "--valid-days",
        type=int,
        metavar="N",
        help=f"the approval expires N days from now (1-{MAX_VALID_DAYS}; default "
        f"{DEFAULT_VALID_DAYS})",
    )
    validity.add_argument(
        "--not-after",
        metavar="RFC3339",
        help="the approval expires at this UTC time, YYYY-MM-DDTHH:MM:SSZ",
    )
    a.add_argument(
        "--out",
        required=True,
        metavar="NAME.approval-ID.json",
        help="the approval file; never replaced if it exists",
    )
    a.add_argument("--json", action="store_true", help="print a JSON result on stdout")
    soft = a.add_argument_group("software signer")
    soft.add_argument(
        "--signer-key",
        metavar="FILE",
        help="your private signing key, PEM or DER: EC P-256 (ES256), P-384 (ES384), Ed25519 "
        "(EdDSA) or RSA >= 3072 (PS256)",
    )
    soft.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="environment variable holding the key's passphrase (else prompt)",
    )
    add_pkcs11_options(
        a.add_argument_group("token signer (PKCS#11: smartcard, HSM)"),
        key_label_help="label of your private signing key in the token (its public key object "
        "has the same label and CKA_ID)",
    )

    t = sub.add_parser("types", help="list the supported target types")
    t.add_argument("--json", action="store_true")
    return parser


class NotAPackage(ByokError):
    """``inspect`` was given something that is no .byok package at all: one refusal instead
    of a report of empty fields (its findings stay in the JSON)."""

    def __init__(self, message: str, *, reason: str, findings: list[dict[str, str]]) -> None:
        super().__init__(message, reason=reason)
        self.findings = findings


def _refuse(exc: ByokError, *, as_json: bool) -> int:
    message = one_line(exc.message)
    print(f"{TOOL_NAME}: refused [{exc.reason}]: {message}", file=sys.stderr)
    if as_json:
        doc: dict[str, Any] = {"status": "refused", "reason": exc.reason, "message": message}
        if isinstance(exc, NotAPackage):
            doc |= {"valid": False, "findings": exc.findings}
        print(json.dumps(doc))
    return EXIT_REFUSED


def main(argv: Sequence[str] | None = None, *, clock: Clock | None = None) -> int:
    """Entry point. ``clock`` is a seam for tests (defaults to UTC now). Ctrl-C ends with
    130 and a reader that went away (``| head``) with 141, never with a traceback."""

    def command() -> int:
        try:
            args = build_parser().parse_args(argv)
        except UsageError as exc:  # one line (a JSON object too with --json), exit 2
            return usage_error(exc, as_json="--json" in (sys.argv[1:] if argv is None else argv))
        now: Clock = clock or (lambda: datetime.now(UTC))
        as_json = bool(getattr(args, "json", False))
        try:
            return _run(args, now, as_json=as_json)
        except ByokError as exc:
            return _refuse(exc, as_json=as_json)

    return ending(TOOL_NAME, "nothing partial was written", command)


def _run(args: argparse.Namespace, now: Clock, *, as_json: bool) -> int:
    if args.command == "verify-kek-attestation":
        result = cmd_verify_attestation(args, now)
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            print(f"KEK {result['kek']} (SPKI SHA-256 {result['kek_spki_sha256']})")
            print(_attestation_lines(result))
            print("result: VERIFIED")
        return EXIT_OK
    if args.command == "wrap":
        result = cmd_wrap(args, now)
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            fp = result["fingerprint"]
            print(f"wrote {result['package']} and {result['manifest']}")
            print(f"  target {result['target_type']}, {fp['kind']} {fp['value']}")
            print(f"  package SHA-256 {result['package_sha256']}")
            print(f"  KEK {result['kek_kid']} (SPKI SHA-256 {result['kek_spki_sha256']})")
            if result["kek_attestation"]:
                print(_attestation_lines(result["kek_attestation"]) + " (in the manifest)")
        return EXIT_OK
    if args.command == "wrap-batch":
        summary = cli_batch.cmd_wrap_batch(args, now)
        cli_batch.print_summary(summary, as_json=as_json)
        if summary["status"] == "interrupted":
            print(
                f"{TOOL_NAME}: interrupted: the keys wrapped before are complete, the key in "
                "flight left nothing",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        return EXIT_OK if summary["status"] == "ok" else EXIT_REFUSED
    if args.command == "approve":
        result = cmd_approve(args, now, as_json=as_json)
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            print(
                f"  signer:            {result['alg']}, SPKI SHA-256 {result['signer_spki_sha256']}"
            )
            print(f"  signed at:         {result['signed_at']}")
            print(f"wrote {result['approval']}")
        return EXIT_OK
    if args.command == "inspect":
        report, valid = cmd_inspect(args, now)
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            _print_inspect(report)
        if not valid:
            for f in report["findings"]:
                print(f"{TOOL_NAME}: invalid [{f['reason']}]: {f['message']}", file=sys.stderr)
        return EXIT_OK if valid else EXIT_REFUSED
    result = cmd_types()
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for t in result["types"]:
            print(f"{t['type']:10} {t['kty']:8} default ops: {','.join(t['default_key_ops'])}")
    return EXIT_OK
