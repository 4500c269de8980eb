"""``byok-package wrap-batch``: its options, the run (one KEK load, one token login) and the
summary it prints. The batch itself: :mod:`offline_packager.batch`."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_common import (
    Clock,
    add_attestation_options,
    add_kek_options,
    add_pkcs11_options,
    env_secret,
    kek_context,
    read_file,
)
from .errors import ByokError, OutputError
from .keytypes import TARGET_TYPES, TYPE_NAMES
from .kid import KEY_NAME_RE

if TYPE_CHECKING:
    from .batch_sources import BatchItem
    from .pkcs11_source import TokenSession

MAX_GENERATE = 5000  # Managed HSM holds at most 5,000 keys (service-limits.md)
MAX_PREFIX = 100  # PREFIX-TYPE-NNNN stays within a key name's 127 characters
MAX_CSV_BYTES = 16 * 1024 * 1024

SYNOPSIS = """\
byok-package wrap-batch --kek KEK.pem --kek-kid KID [--kek-sha256 HEX]
       [--kek-attestation FILE [--trust-test-root FILE]]
       (--keys DIR|FILE.csv | --generate TYPE[:COUNT] | --labels L1,L2,...)...
       [--name-prefix PREFIX] [--passphrase-env VAR]
       [--pkcs11-module LIB --token-label LABEL [--pin-env VAR]]
       --out-dir DIR [--force] [--json]"""

EPILOG = """\
One process, one KEK load and check, many keys: each key gets NAME.byok and NAME.manifest.json
in --out-dir exactly as `wrap` writes them (atomically; an existing file is refused for that
key unless --force). A key `wrap` would refuse is refused with the same reason and the batch
goes on; the exit code is 0 when every key was wrapped, 2 when any was refused (or the batch
as a whole: the KEK, the list, the token), 130 when interrupted (the keys before are complete,
the key in flight left nothing).

key sources (combine them; every name must be unique):
  --keys DIR        every file directly in DIR ending .pem .key .der .jwk .json (read as `wrap
                    --key` reads them) or .bin .raw (raw AES bytes); NAME is the file name
                    without its suffix; other files are listed as ignored
  --keys FILE.csv   a header row, then one key per row; columns: name (required), key_file
                    (relative to the CSV) or pkcs11_label, type (optional: the key must be of
                    it), key_ops (optional, space-separated); lines starting with # are skipped
  --generate TYPE:COUNT  COUNT fresh keys made in memory, named PREFIX-TYPE-N; for tests and
                    demos: never written in plaintext anywhere
  --labels L1,L2    keys in the token (--pkcs11-module, --token-label): one session, one login;
                    NAME is the label (use a CSV's pkcs11_label column for other names)

A progress line is shown on stderr when it is a terminal; each refused key gets one line
`byok-package: refused [REASON]: NAME: sentence` on stderr. At the end, a summary on stdout:
one line per key and the totals, or with --json one JSON document (summary_version, status
ok|refused|interrupted, out_dir, kek_kid, kek_spki_sha256, kek_attestation, totals {keys,
wrapped, refused, not_attempted}, seconds, keys [{name, source, status wrapped|refused, reason,
message, target_type, key_ops, fingerprint, package, manifest, package_sha256}], ignored_files).

examples:
  byok-package wrap-batch --kek KEK.pem --kek-kid KID --kek-sha256 HEX --keys keys/ --out-dir out/
  byok-package wrap-batch --kek KEK.pem --kek-kid KID --kek-sha256 HEX \\
      --generate ec-p256:200 --generate oct-256:200 --out-dir out/ --json
  byok-package wrap-batch --kek KEK.pem --kek-kid KID --kek-sha256 HEX \\
      --pkcs11-module /usr/lib/softhsm/libsofthsm2.so --token-label T --pin-env TOKEN_PIN \\
      --labels payments-2026,signing-2026 --out-dir out/
"""


def parse_generate(text: str) -> tuple[str, int]:
    """``TYPE[:COUNT]`` of ``--generate`` (an argparse type: a bad value is a usage error)."""
    type_name, _, count_text = text.partition(":")
    type_name = type_name.strip().lower()
    if type_name not in TARGET_TYPES:
        raise argparse.ArgumentTypeError(
            f"unknown type {type_name!r} in {text!r}; types: {', '.join(TYPE_NAMES)}"
        )
    count_text = count_text.strip() or "1"
    if not count_text.isdigit() or not 1 <= int(count_text) <= MAX_GENERATE:
        raise argparse.ArgumentTypeError(
            f"COUNT in {text!r} must be a number from 1 to {MAX_GENERATE}"
        )
    return type_name, int(count_text)


def add_parser(sub: Any) -> None:
    """The ``wrap-batch`` subcommand's options."""
    b = sub.add_parser(
        "wrap-batch",
        help="wrap many keys under one KEK (a folder, a CSV, generated, token labels)",
        usage=SYNOPSIS,
        description="Wrap many target keys under one KEK into NAME.byok + NAME.manifest.json "
        "each, in one process.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_kek_options(b)
    add_attestation_options(b)
    keys = b.add_argument_group("keys (at least one; repeatable)")
    keys.add_argument(
        "--keys",
        action="append",
        default=[],
        metavar="DIR|FILE.csv",
        help="a folder of key files, or a CSV key list (see below)",
    )
    keys.add_argument(
        "--generate",
        action="append",
        default=[],
        type=parse_generate,
        metavar="TYPE[:COUNT]",
        help=f"COUNT new keys of TYPE made in memory (tests, demos): {', '.join(TYPE_NAMES)}",
    )
    keys.add_argument(
        "--labels",
        action="append",
        default=[],
        metavar="L1,L2,...",
        help="labels of keys in the token (--pkcs11-module); each label is the key name",
    )
    b.add_argument(
        "--name-prefix",
        default="gen",
        metavar="PREFIX",
        help="names of generated keys: PREFIX-TYPE-N (default gen)",
    )
    b.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="environment variable holding the passphrase of encrypted PEM files (else one prompt)",
    )
    b.add_argument(
        "--out-dir", required=True, metavar="DIR", help="existing folder for the packages"
    )
    b.add_argument("--force", action="store_true", help="replace existing output files")
    b.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    add_pkcs11_options(b.add_argument_group("token keys (PKCS#11)"), key_label_help=None)


def _check_arguments(args: argparse.Namespace) -> Path:
    """The output folder, after the usage checks.

    Raises:
        ByokError: ``bad_arguments``.
        OutputError: ``output_unwritable`` (the output folder does not exist).
    """
    if not (args.keys or args.generate or args.labels):
        raise ByokError(
            "give the keys: --keys DIR|FILE.csv, --generate TYPE:COUNT or --labels",
            reason="bad_arguments",
        )
    if not KEY_NAME_RE.fullmatch(args.name_prefix) or len(args.name_prefix) > MAX_PREFIX:
        raise ByokError(
            f"--name-prefix must be 1-{MAX_PREFIX} of 0-9 a-z A-Z -", reason="bad_arguments"
        )
    if args.labels and not (args.pkcs11_module and args.token_label):
        raise ByokError("--labels needs --pkcs11-module and --token-label", reason="bad_arguments")
    out_dir = Path(args.out_dir)
    if not out_dir.is_dir():
        raise OutputError(f"folder {out_dir} does not exist", reason="output_unwritable")
    return out_dir


def _items(args: argparse.Namespace, out_dir: Path) -> tuple[list[BatchItem], list[str]]:
    """The batch's keys in order (each --keys, then --generate, then --labels) and the files
    ignored in key folders.

    Raises:
        ByokError: ``bad_arguments``, ``unreadable_input``, ``bad_batch_list``.
    """
    from .batch_sources import generated_items, items_from_csv, items_from_folder, label_items

    items: list[BatchItem] = []
    ignored: list[str] = []
    for keys in args.keys:
        path = Path(keys)
        if path.is_dir():
            if path.resolve() == out_dir.resolve():
                raise ByokError(
                    f"--out-dir {out_dir} is the key folder {path}: choose another folder",
                    reason="bad_arguments",
                )
            found, skipped = items_from_folder(path)
            items.extend(found)
            ignored.extend(skipped)
        elif path.suffix.lower() == ".csv":
            items.extend(items_from_csv(path, read_file(keys, "key list", limit=MAX_CSV_BYTES)))
        elif path.exists():
            raise ByokError(
                f"--keys {keys}: give a folder of key files or a .csv key list",
                reason="bad_arguments",
            )
        else:
            raise ByokError(f"--keys {keys}: no such folder or file", reason="unreadable_input")
    items.extend(generated_items(args.generate, args.name_prefix))
    items.extend(label_items(args.labels))
    if not items:
        raise ByokError(
            f"nothing to wrap: no key files in {', '.join(args.keys)}", reason="bad_arguments"
        )
    if any(i.pkcs11_label is not None for i in items) and not (
        args.pkcs11_module and args.token_label
    ):
        raise ByokError(
            "the key list names PKCS#11 labels: give --pkcs11-module and --token-label",
            reason="bad_arguments",
        )
    return items, ignored


@contextlib.contextmanager
def _token(args: argparse.Namespace, needed: bool) -> Iterator[TokenSession | None]:
    """The token session (one login) when a key comes from the token, else None.

    Raises:
        Pkcs11Error: the module, the token or the login failed.
    """
    if not needed:
        yield None
        return
    from .pkcs11_source import open_token

    pin = env_secret(args.pin_env, "token user PIN")
    with open_token(args.pkcs11_module, args.token_label, pin) as token:
        yield token


def cmd_wrap_batch(args: argparse.Namespace, clock: Clock) -> dict[str, Any]:
    """Wrap every key of the batch; the summary document (see :func:`~.batch.summary`).

    Raises:
        ByokError: a refusal of the batch as a whole, before any key is written: the usage,
            the key list, the KEK (and its attestation), the token (module, label, PIN).
    """
    from .batch import BatchRun, Progress, run_batch, summary

    out_dir = _check_arguments(args)
    items, ignored = _items(args, out_dir)
    ctx = kek_context(args, clock)
    progress = Progress(len(items))
    ask = env_secret(args.passphrase_env, "key passphrase", remember=True)

    def passphrase() -> bytes:
        progress.clear()  # a prompt starts on a line of its own
        return ask()

    with _token(args, any(i.pkcs11_label is not None for i in items)) as token:
        run = BatchRun(ctx, out_dir, clock, force=args.force, passphrase=passphrase, token=token)
        result = run_batch(
            items, run, progress=progress, notice=lambda line: print(line, file=sys.stderr)
        )
    return summary(result, ctx, out_dir, ignored)


def print_summary(doc: dict[str, Any], *, as_json: bool) -> None:
    """The summary on stdout: the JSON document, or one line per key and the totals."""
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    for key in doc["keys"]:
        if key["status"] == "wrapped":
            print(f"wrapped  {key['name']}  {key['target_type']}  SHA-256 {key['package_sha256']}")
        else:
            print(f"refused  {key['name']}  [{key['reason']}] {key['message']}")
    for path in doc["ignored_files"]:
        print(f"ignored  {path} (not a key file: .pem .key .der .jwk .json .bin .raw)")
    totals = doc["totals"]
    per_key = doc["seconds"] * 1000 / max(1, totals["wrapped"] + totals["refused"])
    print(
        f"{totals['wrapped']} of {totals['keys']} keys wrapped, {totals['refused']} refused"
        + (
            f", {totals['not_attempted']} not attempted (interrupted)"
            if totals["not_attempted"]
            else ""
        )
        + f", in {doc['seconds']:.2f} s ({per_key:.1f} ms per key); packages in {doc['out_dir']}"
    )
    print(f"KEK {doc['kek_kid']} (SPKI SHA-256 {doc['kek_spki_sha256']})")
