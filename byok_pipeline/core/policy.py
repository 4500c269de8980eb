"""The import policy: which key names may be imported, as which target types, with whose
approvals, and whether an existing key may get a new version. Pure: bytes in, decisions out.

Schema: ``byok_pipeline/schemas/import-policy.schema.json`` (validated at load, then the
cross-references the schema cannot express: approver groups named by rules exist and are large
enough, approver keys parse and are strong enough).

Without a policy the safe defaults of :func:`check_existing_key` still hold.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cache
from importlib import resources
from typing import Any

from byok_pipeline.core.errors import Rejected
from offline_packager.approval import ApprovalError, Approver, parse_approvers
from offline_packager.package_format import load_json_strict

#: How long a package may wait for its approvals unless the policy says otherwise.
DEFAULT_DEADLINE_HOURS = 72
#: A policy larger than this is refused before parsing.
MAX_POLICY_BYTES = 1024 * 1024


class PolicyInvalid(Rejected):
    """The policy document is not valid; the message names the field. Nothing is imported
    while the configured policy is invalid."""

    def __init__(self, message: str) -> None:
        super().__init__("policy_invalid", message)


@dataclass(frozen=True)
class ApprovalRequirement:
    group: str
    required: int


@dataclass(frozen=True)
class Rule:
    """One rule; exactly one of ``name`` (exact) or ``prefix`` is set."""

    name: str | None
    prefix: str | None
    target_types: frozenset[str] | None  # None: any type Managed HSM accepts
    approvals: ApprovalRequirement | None
    allow_new_version: bool

    @property
    def label(self) -> str:
        return f"name {self.name!r}" if self.name else f"prefix {self.prefix!r}"


@dataclass(frozen=True)
class ImportPolicy:
    sha256: str
    rules: tuple[Rule, ...]
    groups: dict[str, dict[str, Approver]] = field(default_factory=dict)
    approval_deadline: timedelta = timedelta(hours=DEFAULT_DEADLINE_HOURS)

    def rule_for(self, key_name: str) -> Rule | None:
        """The exact-name rule, else the longest matching prefix, else None. Managed HSM key
        names are case-insensitive, so is the match (``PAY-key`` is ``pay-key``)."""
        name = key_name.casefold()
        for rule in self.rules:
            if rule.name is not None and rule.name.casefold() == name:
                return rule
        prefixed = [r for r in self.rules if r.prefix and name.startswith(r.prefix.casefold())]
        return max(prefixed, key=lambda r: len(r.prefix or ""), default=None)

    def summary(self) -> dict[str, Any]:
        """Public facts for ``byok policy show`` (approver keys by SPKI SHA-256 only)."""
        return {
            "sha256": self.sha256,
            "approval_deadline_hours": int(self.approval_deadline.total_seconds() // 3600),
            "rules": [
                {
                    "match": rule.label,
                    "target_types": sorted(rule.target_types) if rule.target_types else "any",
                    "approvals": (
                        f"{rule.approvals.required} of group {rule.approvals.group!r}"
                        if rule.approvals
                        else "none"
                    ),
                    "allow_new_version": rule.allow_new_version,
                }
                for rule in self.rules
            ],
            "approver_groups": {
                name: [
                    {
                        "id": a.id,
                        "spki_sha256": a.spki_sha256,
                        "expires": a.expires.strftime("%Y-%m-%dT%H:%M:%SZ") if a.expires else None,
                    }
                    for a in members.values()
                ]
                for name, members in self.groups.items()
            },
        }


@cache
def policy_schema() -> dict[str, Any]:
    text = resources.files("byok_pipeline").joinpath("schemas/import-policy.schema.json")
    schema: dict[str, Any] = json.loads(text.read_text(encoding="utf-8"))
    return schema


def _where(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(the document)"


def load_policy(data: bytes) -> ImportPolicy:
    """Parse and validate a policy document.

    Raises:
        PolicyInvalid: not strict JSON, not valid against the schema, or a cross-reference
            fails; the message names the field (``rules[2].approvals.group: ...``).
    """
    import jsonschema

    if len(data) > MAX_POLICY_BYTES:
        raise PolicyInvalid(f"the policy is over {MAX_POLICY_BYTES} bytes")
    try:
        doc = load_json_strict(data, what="policy")
    except Exception as exc:  # noqa: BLE001  # any parse failure (depth, digits) is the same refusal
        raise PolicyInvalid(f"not strict JSON: {exc}") from None
    validator = jsonschema.Draft202012Validator(policy_schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        raise PolicyInvalid(f"{_where(first.absolute_path)}: {first.message}"[:500])
    groups: dict[str, dict[str, Approver]] = {}
    for name, group in (doc.get("approver_groups") or {}).items():
        try:
            groups[name] = parse_approvers(group)
        except ApprovalError as exc:
            raise PolicyInvalid(f"approver_groups.{name}.{exc.message}") from None
    rules = []
    seen: set[tuple[str, str]] = set()
    for i, raw in enumerate(doc["rules"]):
        key = ("name", raw["name"]) if "name" in raw else ("prefix", raw["prefix"])
        key = (key[0], key[1].casefold())  # key names are case-insensitive in Managed HSM
        if key in seen:
            raise PolicyInvalid(f"rules[{i}]: a second rule for {key[0]} {key[1]!r}")
        seen.add(key)
        need = raw.get("approvals")
        if need is not None:
            members = groups.get(need["group"])
            if members is None:
                raise PolicyInvalid(
                    f"rules[{i}].approvals.group: no approver group {need['group']!r}"
                )
            if need["required"] > len(members):
                raise PolicyInvalid(
                    f"rules[{i}].approvals.required: {need['required']} of a group of "
                    f"{len(members)} can never be met"
                )
        rules.append(
            Rule(
                name=raw.get("name"),
                prefix=raw.get("prefix"),
                target_types=frozenset(raw["target_types"]) if "target_types" in raw else None,
                approvals=ApprovalRequirement(need["group"], need["required"]) if need else None,
                allow_new_version=bool(raw.get("allow_new_version", False)),
            )
        )
    hours = doc.get("approval_deadline_hours", DEFAULT_DEADLINE_HOURS)
    return ImportPolicy(
        sha256=hashlib.sha256(data).hexdigest(),
        rules=tuple(rules),
        groups=groups,
        approval_deadline=timedelta(hours=hours),
    )


# -- decisions ---------------------------------------------------------------------------------


def check_name(policy: ImportPolicy | None, key_name: str, *, kek_name: str | None) -> Rule | None:
    """The rule that governs ``key_name`` (None without a policy).

    Raises:
        Rejected: ``key_name_not_allowed``: the name is the configured KEK's, or no rule of the
            policy matches it.
    """
    if kek_name and key_name.lower() == kek_name.lower():
        raise Rejected(
            "key_name_not_allowed",
            f"{key_name!r} is the name of the KEK (BYOK_KEK_KID): a package never becomes a "
            "version of the key exchange key; choose another key name",
        )
    if policy is None:
        return None
    rule = policy.rule_for(key_name)
    if rule is None:
        raise Rejected(
            "key_name_not_allowed",
            f"the import policy (sha256 {policy.sha256[:12]}...) has no rule for {key_name!r}: "
            "ask a policy administrator to add one (`byok policy show` lists the rules)",
        )
    return rule


def check_target_type(rule: Rule | None, key_name: str, target_type: str | None) -> None:
    """Raises:
    Rejected: ``target_type_not_allowed_for_name``.
    """
    if rule is None or rule.target_types is None or target_type is None:
        return
    if target_type not in rule.target_types:
        raise Rejected(
            "target_type_not_allowed_for_name",
            f"the import policy allows {sorted(rule.target_types)} for {key_name!r} "
            f"({rule.label}), not {target_type}: wrap a key of an allowed type",
        )


@dataclass(frozen=True)
class ExistingKey:
    """What the HSM says about the current version of a key name (None: no such key)."""

    kid: str
    key_ops: tuple[str, ...]
    package_sha256_tag: str | None  # the pipeline's tag: set when the pipeline imported it
    package_id_tag: str | None = None  # the package's canonical identity (same import)


def check_existing_key(
    existing: ExistingKey | None, rule: Rule | None, key_name: str, *, policy: bool
) -> None:
    """Protection of existing keys. Never a version on top of a key exchange key (a key with
    ``import`` among its operations). Without a policy: never on top of a key the pipeline did
    not import itself (no ``byok-package-sha256`` tag on its current version). With a policy:
    only where the name's rule says ``allow_new_version``.

    Raises:
        Rejected: ``existing_key_protected``.
    """
    if existing is None:
        return
    if "import" in existing.key_ops:
        raise Rejected(
            "existing_key_protected",
            f"{key_name!r} is a key exchange key (its operations include import): a package "
            "never adds a version to it; choose another key name",
        )
    if policy:
        if rule is not None and rule.allow_new_version:
            return
        raise Rejected(
            "existing_key_protected",
            f"{key_name!r} already exists ({existing.kid}) and the import policy does not allow "
            "a new version of it (allow_new_version): choose a new name, or ask a policy "
            "administrator to allow rotation for this name",
        )
    if existing.package_sha256_tag is None:
        raise Rejected(
            "existing_key_protected",
            f"{key_name!r} already exists ({existing.kid}) and was not imported by this "
            "pipeline: it is never given a new version without an import policy that allows it",
        )
