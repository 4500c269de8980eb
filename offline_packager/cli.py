"""``byok-package``: the air-gapped packager's command line.

Exit codes: 0 success; 2 refused (a one-line reason on stderr, no file written); 1 failure.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import TOOL_NAME, __version__
from .atomic import check_writable, write_files_atomically
from .checks import PackageReport, check_package
from .errors import ByokError
from .kek import Kek, load_kek_pem, verify_fingerprint
from .keytypes import TARGET_TYPES, TYPE_NAMES
from .kid import parse_kid
from .manifest import parse_manifest
from .package_format import load_json_strict
from .packager import build_package, key_name_from_output, resolve_key_ops
from .target_keys import TargetPublic, generate_target, load_target
from .wrap import wrap_target

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2
Clock = Callable[[], datetime]

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


def _read_file(path: str, what: str, *, limit: int = 1024 * 1024) -> bytes:
    try:
        with Path(path).open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise ByokError(
            f"cannot read {what} {path}: {exc.strerror}", reason="unreadable_input"
        ) from None
    if len(data) > limit:
        raise ByokError(f"{what} {path} is larger than {limit} bytes", reason="unreadable_input")
    return data


def _env_secret(var: str | None, prompt: str) -> Callable[[], bytes]:
    def provide() -> bytes:
        if var:
            value = os.environ.get(var)
            if value is None:
                raise ByokError(f"environment variable {var} is not set", reason="bad_passphrase")
            return value.encode()
        if not sys.stdin.isatty():
            raise ByokError(
                f"{prompt} needed: set it with an environment variable option",
                reason="bad_passphrase",
            )
        return getpass.getpass(f"{prompt}: ").encode()

    return provide


def _load_kek(args: argparse.Namespace) -> Kek:
    kek = load_kek_pem(_read_file(args.kek, "KEK file", limit=64 * 1024))
    if args.kek_sha256:
        verify_fingerprint(kek, args.kek_sha256)
    else:
        print(
            f"{TOOL_NAME}: warning: no --kek-sha256: the KEK file was not checked against the "
            f"fingerprint shown on the connected side (this file: {kek.fingerprint})",
            file=sys.stderr,
        )
    return kek


def cmd_wrap(args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    """Wrap one target key into NAME.byok + NAME.manifest.json."""
    out = Path(args.out)
    key_name = key_name_from_output(out)
    manifest_path = (
        Path(args.manifest) if args.manifest else out.with_name(f"{key_name}.manifest.json")
    )
    check_writable([out, manifest_path], force=args.force)
    kek_kid = parse_kid(args.kek_kid)
    kek = _load_kek(args)

    source: dict[str, str]
    target: TargetPublic
    if args.pkcs11_module:
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
            pin=_env_secret(args.pin_env, "token user PIN"),
            key_label=args.key_label,
            generate=args.generate,
        )
        if args.generate:
            resolve_key_ops(TARGET_TYPES[args.generate], args.key_ops)
        result = wrap_in_token(request, kek=kek)
        for warning in result.warnings:
            print(f"{TOOL_NAME}: warning: {warning}", file=sys.stderr)
        ciphertext, target, source = result.ciphertext, result.target, dict(result.key_source)
        key_ops = resolve_key_ops(target.type, args.key_ops)
    else:
        if args.key_label or args.token_label:
            raise ByokError(
                "--key-label/--token-label need --pkcs11-module", reason="bad_arguments"
            )
        if args.generate:
            key = generate_target(args.generate)
            source = {"kind": "software-generated"}
        elif args.key:
            data = _read_file(args.key, "key file")
            key = load_target(
                data,
                key_type=args.key_type,
                passphrase=_env_secret(args.passphrase_env, "key passphrase"),
            )
            source = {"kind": "software-file"}
        else:
            raise ByokError(
                "give --key FILE, --generate TYPE or --pkcs11-module", reason="bad_arguments"
            )
        with key.plaintext:
            key_ops = resolve_key_ops(key.type, args.key_ops)
            ciphertext = wrap_target(kek.public_key, key.plaintext)
        target = key.public

    built = build_package(
        kek=kek,
        kek_kid=kek_kid,
        ciphertext=ciphertext,
        target=target,
        key_ops=key_ops,
        key_source=source,
        package_name=out.name,
        created=clock(),
    )
    manifest_bytes = (json.dumps(built.manifest, indent=2) + "\n").encode()
    write_files_atomically(
        [(out, built.package_bytes), (manifest_path, manifest_bytes)], force=args.force
    )
    return {
        "status": "ok",
        "package": str(out),
        "manifest": str(manifest_path),
        "package_sha256": built.manifest["package"]["sha256"],
        "key_name": key_name,
        "target_type": target.type.name,
        "key_ops": list(key_ops),
        "fingerprint": built.manifest["target"]["fingerprint"],
        "kek_kid": kek_kid.kid,
        "kek_spki_sha256": kek.fingerprint,
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


def cmd_inspect(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """Check a package offline; with a manifest, cross-check it too."""
    data = _read_file(args.package, "package", limit=1024 * 1024)
    kek = load_kek_pem(_read_file(args.kek, "KEK file", limit=64 * 1024)) if args.kek else None
    manifest_path = (
        Path(args.manifest) if args.manifest else Path(args.package).with_suffix(".manifest.json")
    )
    manifest: dict[str, Any] | None = None
    if args.manifest or manifest_path.is_file():
        manifest = parse_manifest(
            load_json_strict(_read_file(str(manifest_path), "manifest"), what="manifest")
        )
    kek_kid = args.kek_kid or (manifest["kek"]["kid"] if manifest else None)
    stated = args.type or (manifest["target"]["type"] if manifest else None)
    report = check_package(data, kek=kek, kek_kid=kek_kid, stated_type=stated)
    if manifest is not None:
        import hashlib

        if manifest["package"].get("sha256") != hashlib.sha256(data).hexdigest():
            report.add("manifest_mismatch", "the package's SHA-256 differs from its manifest's")
        if kek is not None and manifest["kek"].get("spki_sha256") != kek.fingerprint:
            report.add(
                "kek_mismatch", "the KEK file's SPKI SHA-256 differs from the manifest's KEK"
            )
    result = _report_dict(args.package, report)
    result["manifest"] = str(manifest_path) if manifest is not None else None
    return result, report.valid


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
    if result["valid"]:
        print("result:       VALID")
    else:
        print("result:       INVALID")
        for f in result["findings"]:
            print(f"  - [{f['reason']}] {f['message']}")


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
    parser = argparse.ArgumentParser(
        prog=TOOL_NAME,
        description="Air-gapped packager: wrap a target key under a Managed HSM KEK into a .byok "
        "file (CKM_RSA_AES_KEY_WRAP), and inspect packages offline. Exit codes: 0 ok, "
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
    w.add_argument(
        "--kek", required=True, metavar="KEK.pem", help="KEK public key (PEM SubjectPublicKeyInfo)"
    )
    w.add_argument(
        "--kek-kid", required=True, metavar="KID", help="the KEK's full kid, with its version"
    )
    w.add_argument(
        "--kek-sha256",
        metavar="HEX",
        help="SHA-256 of the KEK's SPKI as shown on the connected side: refuse on mismatch (strongly recommended)",
    )
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
    w.add_argument("--force", action="store_true", help="replace existing output files")
    w.add_argument("--json", action="store_true", help="print a JSON result on stdout")
    hsm = w.add_argument_group("HSM mode (PKCS#11)")
    hsm.add_argument(
        "--pkcs11-module",
        metavar="LIB",
        help="PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so",
    )
    hsm.add_argument("--token-label", metavar="LABEL", help="token label")
    hsm.add_argument(
        "--pin-env", metavar="VAR", help="environment variable holding the user PIN (else prompt)"
    )
    hsm.add_argument(
        "--key-label",
        metavar="LABEL",
        help="label of the target key in the token (found, or created with --generate)",
    )

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
    i.add_argument("--json", action="store_true", help="print the report as JSON")

    t = sub.add_parser("types", help="list the supported target types")
    t.add_argument("--json", action="store_true")
    return parser


def _refuse(exc: ByokError, *, as_json: bool) -> int:
    message = exc.message.replace("\n", " ")
    print(f"{TOOL_NAME}: refused [{exc.reason}]: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"status": "refused", "reason": exc.reason, "message": message}))
    return EXIT_REFUSED


def main(argv: Sequence[str] | None = None, *, clock: Clock | None = None) -> int:
    """Entry point. ``clock`` is a seam for tests (defaults to UTC now)."""
    args = build_parser().parse_args(argv)
    now: Clock = clock or (lambda: datetime.now(UTC))
    as_json = bool(getattr(args, "json", False))
    try:
        return _run(args, now, as_json=as_json)
    except ByokError as exc:
        return _refuse(exc, as_json=as_json)
    except KeyboardInterrupt:
        print(f"{TOOL_NAME}: interrupted; no file written", file=sys.stderr)
        return EXIT_FAILED


def _run(args: argparse.Namespace, now: Clock, *, as_json: bool) -> int:
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
        return EXIT_OK
    if args.command == "inspect":
        report, valid = cmd_inspect(args)
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
