"""Keys as the emulator holds them: versions, attributes, tags and the key-operation rules."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .errors import BadParameterError, ForbiddenError
from .material import Family, KeyMaterial

Origin = Literal["generated", "imported", "byok"]
KEY_OPS = ("encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey", "import")
# What each family's keys can do in Managed HSM (besides "import", which only RSA KEKs get).
FAMILY_OPS: dict[Family, frozenset[str]] = {
    "RSA": frozenset({"encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"}),
    "EC": frozenset({"sign", "verify"}),
    "oct": frozenset({"encrypt", "decrypt", "wrapKey", "unwrapKey"}),
}
DEFAULT_OPS: dict[Family, tuple[str, ...]] = {
    "RSA": ("encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"),
    "EC": ("sign", "verify"),
    "oct": ("encrypt", "decrypt", "wrapKey", "unwrapKey"),
}
MAX_TAGS = 15
MAX_TAG_NAME = 512
MAX_TAG_VALUE = 256


def check_key_ops(family: Family, ops: object, *, origin: Origin) -> tuple[str, ...]:
    """Validate requested key operations; ``None`` means the family's defaults.

    ``import`` is allowed only on RSA keys generated in the HSM, and only alone.

    Raises:
        BadParameterError: reasons ``bad_key_ops`` and ``import_not_alone``.
    """
    if ops is None:
        return DEFAULT_OPS[family]
    if not isinstance(ops, list) or not all(isinstance(op, str) for op in ops):
        raise BadParameterError("key_ops must be a list of strings", reason="bad_key_ops")
    unknown = sorted(set(ops) - set(KEY_OPS))
    if unknown:
        raise BadParameterError(
            f"unknown key operation(s) {', '.join(unknown)}; known: {', '.join(KEY_OPS)}",
            reason="bad_key_ops",
        )
    if "import" in ops:
        if family != "RSA":
            raise BadParameterError(
                "the import operation is allowed only on RSA-HSM keys", reason="bad_key_ops"
            )
        if origin != "generated":
            raise BadParameterError(
                "the import operation is allowed only on keys generated in this HSM",
                reason="bad_key_ops",
            )
        if set(ops) != {"import"}:
            raise BadParameterError(
                "the import operation excludes every other operation; key_ops must be "
                '["import"] exactly',
                reason="import_not_alone",
            )
        return ("import",)
    wrong = sorted(set(ops) - FAMILY_OPS[family])
    if wrong:
        raise BadParameterError(
            f"operation(s) {', '.join(wrong)} are not valid for {family}-HSM keys",
            reason="bad_key_ops",
        )
    return tuple(dict.fromkeys(ops))


def _int_or_none(attrs: Mapping[str, Any], name: str) -> int | None:
    value = attrs.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadParameterError(f"attributes.{name} must be a unix time", reason="bad_attributes")
    return int(value)


@dataclass(frozen=True)
class KeyAttributes:
    """A key version's attributes (unix times)."""

    enabled: bool
    created: int
    updated: int
    nbf: int | None = None
    exp: int | None = None

    @classmethod
    def from_request(cls, attrs: object, *, now: int) -> KeyAttributes:
        """Attributes for a new version from the request's ``attributes`` object.

        Raises:
            BadParameterError: reason ``bad_attributes``.
        """
        return cls(enabled=True, created=now, updated=now).updated_from(attrs, now=now)

    def updated_from(self, attrs: object, *, now: int) -> KeyAttributes:
        """Apply the fields present in a request's ``attributes`` (read-only ones ignored).

        Raises:
            BadParameterError: reason ``bad_attributes``.
        """
        if attrs is None:
            return self
        if not isinstance(attrs, dict):
            raise BadParameterError("attributes must be a JSON object", reason="bad_attributes")
        enabled = attrs.get("enabled", self.enabled)
        if enabled is None:
            enabled = self.enabled
        if not isinstance(enabled, bool):
            raise BadParameterError(
                "attributes.enabled must be true or false", reason="bad_attributes"
            )
        nbf = _int_or_none(attrs, "nbf") if "nbf" in attrs else self.nbf
        exp = _int_or_none(attrs, "exp") if "exp" in attrs else self.exp
        if nbf is not None and exp is not None and exp <= nbf:
            raise BadParameterError("attributes.exp must be after nbf", reason="bad_attributes")
        return replace(self, enabled=enabled, nbf=nbf, exp=exp, updated=now)

    def usable_reason(self, now: float) -> str | None:
        """Why a key with these attributes cannot be used at ``now``; None if it can."""
        if not self.enabled:
            return "disabled"
        if self.nbf is not None and now < self.nbf:
            return "not_yet_valid"
        if self.exp is not None and now >= self.exp:
            return "expired"
        return None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"enabled": self.enabled}
        if self.nbf is not None:
            out["nbf"] = self.nbf
        if self.exp is not None:
            out["exp"] = self.exp
        out["created"] = self.created
        out["updated"] = self.updated
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeyAttributes:
        return cls(
            enabled=bool(data["enabled"]),
            created=int(data["created"]),
            updated=int(data["updated"]),
            nbf=data.get("nbf"),
            exp=data.get("exp"),
        )


def check_tags(tags: object) -> dict[str, str] | None:
    """Validate a ``tags`` object (None when absent).

    Raises:
        BadParameterError: reason ``bad_tags``.
    """
    if tags is None:
        return None
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        raise BadParameterError("tags must be an object of string values", reason="bad_tags")
    if len(tags) > MAX_TAGS:
        raise BadParameterError(f"at most {MAX_TAGS} tags are allowed", reason="bad_tags")
    if any(not k or len(k) > MAX_TAG_NAME or len(v) > MAX_TAG_VALUE for k, v in tags.items()):
        raise BadParameterError(
            f"tag names are 1-{MAX_TAG_NAME} characters, values at most {MAX_TAG_VALUE}",
            reason="bad_tags",
        )
    return dict(tags)


@dataclass
class KeyVersion:
    """One version of a key. ``sealed`` is the at-rest form of its material."""

    name: str
    version: str
    seq: int
    family: Family
    key_ops: tuple[str, ...]
    attributes: KeyAttributes
    tags: dict[str, str]
    public: dict[str, str]
    sealed: bytes
    origin: Origin
    material: KeyMaterial | None = field(default=None, repr=False, compare=False)

    def require_usable(self, op: str, *, now: float) -> None:
        """Refuse an operation the key does not allow, or a key that cannot be used now.

        Raises:
            ForbiddenError: reasons ``operation_not_allowed``, ``key_disabled``,
                ``key_not_yet_valid``, ``key_expired``.
        """
        if op not in self.key_ops:
            raise ForbiddenError(
                f"operation {op} is not allowed by key {self.name}/{self.version} "
                f"(key_ops: {', '.join(self.key_ops)})",
                reason="operation_not_allowed",
            )
        why = self.attributes.usable_reason(now)
        if why is not None:
            raise ForbiddenError(
                f"key {self.name}/{self.version} cannot be used: it is {why.replace('_', ' ')}",
                reason=f"key_{why}",
            )


@dataclass
class DeletedInfo:
    """When a key was soft-deleted and when it will be purged."""

    deleted_date: int
    scheduled_purge_date: int


@dataclass
class KeyRecord:
    """All versions of one key name, in creation order, and its soft-delete state."""

    name: str
    versions: list[KeyVersion]
    deleted: DeletedInfo | None = None

    @property
    def latest(self) -> KeyVersion:
        return self.versions[-1]

    def find_version(self, version: str) -> KeyVersion | None:
        for v in self.versions:
            if v.version == version:
                return v
        return None
