"""The canonical identity of a package: what exactly-once is about.

Two files carrying the same wrapped key for the same KEK are the same package, whatever their
bytes: base64url padding, a BOM, whitespace, CRLF, the order of the JSON fields and the
``generator`` text change the file's SHA-256 but not what would be imported. The identity is
therefore derived from the decoded ciphertext and the KEK kid in its normal form (lower-case
host, and lower-case key name: Key Vault key names are case-insensitive, so ``KEK`` and ``kek``
name the same KEK), never from the file's bytes.
"""

from __future__ import annotations

import hashlib

from offline_packager.kid import KeyId
from offline_packager.package_format import ByokPackage

_DOMAIN = b"byok-package-id/v1\n"


def package_id(package: ByokPackage, kid: KeyId) -> str:
    """SHA-256 (hex) over a domain tag, the normalised KEK kid and the decoded ciphertext."""
    normal = f"{kid.vault_url}/keys/{kid.name.lower()}/{kid.version}"
    digest = hashlib.sha256(_DOMAIN)
    digest.update(normal.encode("ascii") + b"\n")
    digest.update(package.ciphertext)
    return digest.hexdigest()


def same_package(
    sha256_tag: str | None, id_tag: str | None, package_sha256: str, package_id: str | None
) -> bool:
    """A key version's tags name this package: its file's SHA-256, or (a reformatted copy)
    its canonical identity."""
    if sha256_tag == package_sha256:
        return True
    return package_id is not None and id_tag == package_id
