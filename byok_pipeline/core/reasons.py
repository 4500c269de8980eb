"""The documented list of reason codes. Stable: dashboards and automation match on them.

A test checks that every reason code the pipeline can produce is listed here and in the README.
"""

from __future__ import annotations

REASONS: dict[str, str] = {
    # reading
    "too_large": "The package is over the size limit (BYOK_MAX_PACKAGE_BYTES).",
    "bad_key_name": "The blob is not named NAME.byok with NAME matching ^[0-9a-zA-Z-]{1,127}$.",
    "bad_metadata": "The upload metadata (target type, key ops, tags, fingerprint) is invalid.",
    "manifest_mismatch": "The package's SHA-256 differs from the manifest SHA-256 it was uploaded with.",
    # package structure
    "malformed_package": "Not a strict JSON .byok document with the expected fields.",
    "unsupported_schema_version": "schema_version is not 1.0.0.",
    "wrong_alg": "header.alg is not 'dir'.",
    "wrong_enc": "header.enc is not 'CKM_RSA_AES_KEY_WRAP'.",
    "bad_base64": "The ciphertext is not base64url.",
    "bad_kid": "header.kid is not a versioned key identifier.",
    "kid_wrong_hsm": "header.kid names another HSM than the configured one.",
    # the KEK
    "kek_not_allowed": "The KEK's name is not in BYOK_ALLOWED_KEK_NAMES.",
    "kek_missing": "No key with the kid's name and exact version exists in the HSM.",
    "kek_disabled": "The KEK is disabled.",
    "kek_not_yet_valid": "The KEK's nbf (not before) is in the future.",
    "kek_expired": "The KEK's exp (expiry) has passed.",
    "kek_not_rsa": "The KEK is not an RSA-HSM key.",
    "kek_wrong_size": "The KEK is not RSA 2048, 3072 or 4096.",
    "kek_not_import_only": "The KEK's key operations are not exactly ['import'].",
    "kek_mismatch": "The package was not made for the HSM's KEK named by the kid: the manifest's KEK fingerprint differs, or the ciphertext fits only a KEK of another size.",
    # ciphertext vs KEK and target
    "ciphertext_length_mismatch": "The ciphertext is not an RSA block of the KEK's size plus an AES-KWP block.",
    "rsa_block_out_of_range": "The RSA block's integer is not below the KEK modulus.",
    "target_type_unknown": "No target type was stated and none can be inferred from the length.",
    "target_type_mismatch": "The stated target type cannot fit the wrapped length.",
    "target_type_not_allowed": "The target type is not in BYOK_ALLOWED_TARGET_TYPES.",
    # authorization (import policy, approvals, existing keys)
    "key_name_not_allowed": "The key name is the KEK's, or no rule of the import policy matches it: choose another name, or ask a policy administrator to add a rule (`byok policy show`).",
    "existing_key_protected": "A key of that name exists and may not get a new version (a KEK; a key the pipeline did not import; or the policy does not allow_new_version): choose a new name, or have the policy allow rotation.",
    "target_type_not_allowed_for_name": "The import policy does not allow this target type for this key name: wrap a key of an allowed type (`byok policy show`).",
    "approval_invalid": "An approval is malformed, its signature does not verify, or the policy requires approvals and the package came without its manifest: sign again with `byok-package approve`, upload with `byok approve upload`.",
    "approval_unknown_approver": "An approval is signed by an id that is not in the rule's approver group: the approver must be added to the policy, or another approver signs.",
    "approval_expired": "The approvals were not complete before the policy's approval deadline, or an approval (or its approver) is past its validity: collect fresh approvals and upload the package again.",
    "approval_wrong_package": "An approval signs another package, manifest or key name: the approver signs the manifest of exactly this package, for this key name.",
    "fingerprint_unverifiable": "Approvals were required and the approved manifest gives an AES check value, which the HSM computes only with the encrypt operation the key lacks: package the key with encrypt among its operations and have it approved again, or import it under a rule without approvals.",
    "policy_invalid": "The configured import policy is invalid (the message names the field): nothing is imported until an administrator fixes it (`byok policy validate`, `byok policy set`); then upload again.",
    # the HSM
    "key_version_limit": "The key already has as many versions as Managed HSM keeps (100 per key, BYOK_HSM_MAX_VERSIONS_PER_KEY); versions cannot be deleted one by one: import under a new key name (and move its users), then upload again.",
    "hsm_key_limit": "The HSM holds as many keys as Managed HSM allows (5,000, BYOK_HSM_MAX_KEYS): delete and purge keys you no longer need, or use another HSM, then upload again.",
    "earlier_version_disabled": "This package was imported before and that version is disabled (it failed verification, or its import was uncertain): check it in the HSM, enable it by hand if it is right, or import the key under a new name.",
    "hsm_refused": "Managed HSM refused the import; the service's error code is kept.",
    "fingerprint_mismatch": "The imported key does not match the manifest fingerprint (version disabled).",
    "verification_error": "The key was imported but the HSM refused the check that verifies it (version disabled).",
    "attempts_exhausted": "Transient failures persisted for BYOK_MAX_ATTEMPTS deliveries.",
}

#: The ``byok`` command's own codes: it refuses (exit 2) or fails (exit 1) with them before or
#: around the pipeline, never as a package's outcome in a status document. The README lists
#: each; tests/pipeline/test_cli_reasons.py produces each.
CLI_REASONS: dict[str, str] = {
    # refused (exit 2)
    "usage": "The command line does not parse: the message says what is wrong and suggests the command or option meant.",
    "file_not_found": "A file named on the command line does not exist: check the path.",
    "unreadable_input": "A file named on the command line cannot be read (a folder, no permission): check the path and its permissions.",
    "plaintext_key": "The file holds a plaintext private key or a raw key, not a wrapped .byok package: nothing was sent; wrap the key on the offline machine (`byok-package wrap`) and treat a key that was on a connected machine as exposed.",
    "already_imported": "`byok upload`: this exact package (its SHA-256) is already imported into the HSM: nothing to upload (`byok status NAME` shows it).",
    "key_exists": "`byok upload`: a key of that name exists in the HSM: give --new-version to make the package its next version (the import policy must allow it), or wrap it under another name.",
    "duplicate_upload": "`byok upload`: a blob of that name is already waiting in the incoming container: wait for it (`byok status NAME`), or upload under another --name.",
    "kek_exists": "`byok kek create`: a key of that name exists: give --new-version to add a version, or choose another name.",
    "audit_key_exists": "`byok audit init`: the signing key exists: give --new-version to rotate it.",
    "not_found": "No package or key of that name: check the name (`byok status` lists the packages).",
    # failed (exit 1)
    "config_error": "A setting is missing or invalid: the message names it (see Settings).",
    "login_required": "No Azure access token: sign in with `az login` (a managed identity needs access); --verbose shows why each credential failed.",
    "hsm_unreachable": "The HSM cannot be reached: the message names the endpoint and the fix (`byok dev up` for the local stack, BYOK_HSM_URL, BYOK_CLI_CONNECT_TIMEOUT_SECONDS).",
    "storage_unreachable": "Storage cannot be reached: the message names the endpoint and the fix (`byok dev up` for the local stack, BYOK_STORAGE, --storage).",
    "service_error": "A service answered with an error the command cannot act on: the message has its status and code (often a missing role assignment).",
    "os_error": "The operating system refused a file operation: the message names the file.",
    "internal_error": "A bug: please report it with the command you ran (--verbose shows the cause).",
}  # fmt: skip


def describe(reason: str) -> str:
    """The documented sentence for ``reason`` (unknown codes are a programming error)."""
    return REASONS[reason]
