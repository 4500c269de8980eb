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
