"""The key list of ``byok-package wrap-batch``: from a folder, a CSV file, ``--generate`` and
``--labels``. Reading the list reads no key: each entry says where its key is.

Folder (``--keys DIR``): every regular file directly in the folder (not in subfolders) whose
suffix is one of :data:`KEY_SUFFIXES` (any case); the key name is the file name without its
suffix. ``.bin`` and ``.raw`` files hold raw AES key bytes (16, 24 or 32), as ``wrap --key FILE
--key-type oct`` reads them; the others are read as ``wrap --key FILE`` reads them (PEM or DER:
PKCS#8, PKCS#1, SEC1, encrypted PEM; JWK JSON), the format detected. Hidden files and files
with any other suffix are not keys: they are listed as ignored.

CSV (``--keys FILE.csv``, UTF-8, a header row first; blank lines and lines starting with ``#``
are skipped), the columns in any order:

``name``
    the key name to import (required).
``key_file``
    the key file, relative to the CSV's folder (or absolute); read as in a folder (by suffix).
``pkcs11_label``
    instead of ``key_file``: the label of the key in the token given by ``--pkcs11-module``
    and ``--token-label`` (every label in one session, one login).
``type``
    optional: the target type the key must be (``byok-package types``), else the key is
    refused (``target_type_mismatch``).
``key_ops``
    optional: the key operations, separated by spaces, ``;`` or (in a quoted field) commas;
    default per family, as ``wrap``.

A CSV without a ``name`` column, or with an unknown column, is refused as a whole
(``bad_batch_list``); a row that names no key source, or two, or an unknown type, is refused
alone (``bad_batch_row``).
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ByokError
from .keytypes import TARGET_TYPES, TYPE_NAMES

RAW_AES_SUFFIXES = frozenset({".bin", ".raw"})
KEY_SUFFIXES = frozenset({".pem", ".key", ".der", ".jwk", ".json"}) | RAW_AES_SUFFIXES
CSV_COLUMNS = ("name", "key_file", "pkcs11_label", "type", "key_ops")
MAX_BATCH_KEYS = 100_000
_OPS_SEPARATORS = re.compile(r"[\s,;]+")


@dataclass(frozen=True)
class BatchItem:
    """One key of the batch: its name and where its key comes from (exactly one of
    ``key_file``, ``generate``, ``pkcs11_label``), or ``refusal`` when its entry is unusable."""

    name: str
    source: str  # for people: the file, "generated TYPE", "pkcs11 label L", "FILE.csv line N"
    key_file: Path | None = None
    raw_aes: bool = False
    generate: str | None = None
    pkcs11_label: str | None = None
    expected_type: str | None = None
    key_ops: str | None = None
    refusal: ByokError | None = None


def _list_error(message: str) -> ByokError:
    return ByokError(message, reason="bad_batch_list")


def _row_error(message: str) -> ByokError:
    return ByokError(message, reason="bad_batch_row")


def _key_file_item(
    name: str,
    path: Path,
    source: str,
    *,
    expected_type: str | None = None,
    key_ops: str | None = None,
) -> BatchItem:
    raw = path.suffix.lower() in RAW_AES_SUFFIXES
    return BatchItem(
        name=name,
        source=source,
        key_file=path,
        raw_aes=raw,
        expected_type=expected_type,
        key_ops=key_ops,
    )


def items_from_folder(folder: Path) -> tuple[list[BatchItem], list[str]]:
    """One item per key file directly in ``folder``, by name; and the files ignored.

    Raises:
        ByokError: ``unreadable_input`` (the folder cannot be listed).
    """
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise ByokError(
            f"cannot list key folder {folder}: {exc.strerror}", reason="unreadable_input"
        ) from None
    items: list[BatchItem] = []
    ignored: list[str] = []
    for path in entries:
        if path.name.startswith(".") or not path.is_file():
            if not path.name.startswith("."):
                ignored.append(str(path))
            continue
        suffix = path.suffix.lower()
        if suffix not in KEY_SUFFIXES:
            ignored.append(str(path))
            continue
        items.append(_key_file_item(path.name[: -len(suffix)], path, str(path)))
    return items, ignored


def items_from_csv(path: Path, data: bytes) -> list[BatchItem]:
    """One item per row of the CSV key list ``data`` (read from ``path``).

    Raises:
        ByokError: ``bad_batch_list`` (not UTF-8, no header, no ``name`` column, unknown or
            repeated columns, more than :data:`MAX_BATCH_KEYS` rows).
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _list_error(f"the key list {path} is not UTF-8 text") from None
    reader = csv.reader(text.splitlines())
    rows = ((reader.line_num, row) for row in reader if _is_data_row(row))
    first = next(rows, None)
    if first is None:
        raise _list_error(f"the key list {path} has no header row ({','.join(CSV_COLUMNS)})")
    columns = [c.strip().lower() for c in first[1]]
    _check_header(path, columns)
    items: list[BatchItem] = []
    for line, row in rows:
        if len(items) == MAX_BATCH_KEYS:
            raise _list_error(f"the key list {path} has more than {MAX_BATCH_KEYS} rows")
        items.append(_row_item(path, line, columns, row))
    return items


def _is_data_row(row: Sequence[str]) -> bool:
    return any(f.strip() for f in row) and not row[0].lstrip().startswith("#")


def _check_header(path: Path, columns: Sequence[str]) -> None:
    unknown = [c for c in columns if c not in CSV_COLUMNS]
    if unknown:
        raise _list_error(
            f"the key list {path} has unknown column(s) {', '.join(map(repr, unknown))}; "
            f"columns: {', '.join(CSV_COLUMNS)}"
        )
    repeated = [c for c, n in Counter(columns).items() if n > 1]
    if repeated:
        raise _list_error(f"the key list {path} repeats column(s) {', '.join(repeated)}")
    if "name" not in columns or not {"key_file", "pkcs11_label"} & set(columns):
        raise _list_error(
            f"the key list {path} needs a header with a name column and a key_file or "
            "pkcs11_label column"
        )


def _row_item(path: Path, line: int, columns: Sequence[str], row: Sequence[str]) -> BatchItem:
    """The item of one CSV row; a row that cannot be used carries its refusal."""
    fields = {c: (row[i].strip() if i < len(row) else "") for i, c in enumerate(columns)}
    name, source = fields["name"], f"{path} line {line}"
    key_file, label = fields.get("key_file", ""), fields.get("pkcs11_label", "")
    type_name = fields.get("type", "").lower() or None
    key_ops = ",".join(o for o in _OPS_SEPARATORS.split(fields.get("key_ops", "")) if o) or None
    refusal: ByokError | None = None
    if len(row) > len(columns):
        refusal = _row_error(
            f"the row has {len(row)} fields, the header {len(columns)} (quote a key_ops list "
            "that has commas)"
        )
    elif bool(key_file) == bool(label):
        refusal = _row_error("the row must give exactly one of key_file and pkcs11_label")
    elif type_name is not None and type_name not in TARGET_TYPES:
        refusal = _row_error(f"type {type_name!r} is not one of {', '.join(TYPE_NAMES)}")
    if refusal is not None:
        return BatchItem(name=name, source=source, refusal=refusal)
    if label:
        return BatchItem(
            name=name, source=source, pkcs11_label=label, expected_type=type_name, key_ops=key_ops
        )
    file_path = Path(key_file)
    if not file_path.is_absolute():
        file_path = path.parent / file_path
    return _key_file_item(name, file_path, source, expected_type=type_name, key_ops=key_ops)


def generated_items(specs: Iterable[tuple[str, int]], prefix: str) -> list[BatchItem]:
    """``COUNT`` items per ``(TYPE, COUNT)``, named ``PREFIX-TYPE-N`` (N from 1, zero-padded
    to the width of the type's total; repeated types continue the numbering)."""
    specs = list(specs)
    totals = Counter[str]()
    for type_name, count in specs:
        totals[type_name] += count
    made = Counter[str]()
    items: list[BatchItem] = []
    for type_name, count in specs:
        width = len(str(totals[type_name]))
        for _ in range(count):
            made[type_name] += 1
            items.append(
                BatchItem(
                    name=f"{prefix}-{type_name}-{made[type_name]:0{width}d}",
                    source=f"generated {type_name}",
                    generate=type_name,
                )
            )
    return items


def label_items(label_lists: Iterable[str]) -> list[BatchItem]:
    """One item per label of the comma-separated ``--labels`` lists; the name is the label.

    Raises:
        ByokError: ``bad_arguments`` (an empty label).
    """
    items: list[BatchItem] = []
    for text in label_lists:
        labels = [label.strip() for label in text.split(",")]
        if not all(labels):
            raise ByokError(f"--labels {text!r} has an empty label", reason="bad_arguments")
        items.extend(
            BatchItem(name=label, source=f"pkcs11 label {label!r}", pkcs11_label=label)
            for label in labels
        )
    return items
