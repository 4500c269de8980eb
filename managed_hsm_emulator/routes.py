"""Map a method and path of the Key Vault keys API to an operation name and its parameters."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from .errors import MethodNotAllowedError, PathNotFoundError

CRYPTO_OPS = {
    "sign": "sign",
    "verify": "verify",
    "encrypt": "encrypt",
    "decrypt": "decrypt",
    "wrapkey": "wrapKey",
    "unwrapkey": "unwrapKey",
}


@dataclass(frozen=True)
class Route:
    """An operation (e.g. ``get_key``) with the key name/version/crypto op from the path."""

    operation: str
    name: str | None = None
    version: str | None = None  # None or "" means the latest version
    crypto_op: str | None = None


def _pick(method: str, table: dict[str, str], path: str) -> str:
    try:
        return table[method]
    except KeyError:
        raise MethodNotAllowedError(
            f"{method} is not supported on {path}; allowed: {', '.join(sorted(table))}"
        ) from None


def route(method: str, path: str) -> Route:
    """Resolve a request path (without query).

    Raises:
        PathNotFoundError: the path is not part of the keys API this emulator serves.
        MethodNotAllowedError: the path exists but not with ``method``.
    """
    segs = [unquote(s) for s in path.split("/")[1:]]
    if segs and segs[0].lower() == "keys":
        rest = segs[1:]
        if not rest or rest == [""]:
            return Route(_pick(method, {"GET": "list_keys"}, path))
        name = rest[0]
        if len(rest) == 1:
            op = _pick(
                method,
                {
                    "GET": "get_key",
                    "PUT": "import_key",
                    "DELETE": "delete_key",
                    "PATCH": "update_key",
                },
                path,
            )
            return Route(op, name=name)
        second = rest[1]
        if rest[-1] == "attestation" and len(rest) in (2, 3):  # /keys/{n}[/{v}]/attestation
            version = second if len(rest) == 3 else None
            return Route(
                _pick(method, {"GET": "get_key_attestation"}, path), name=name, version=version
            )
        if len(rest) == 2:  # /keys/{name}/{x}
            if second == "create":
                return Route(_pick(method, {"POST": "create_key"}, path), name=name)
            if second == "versions":
                return Route(_pick(method, {"GET": "list_versions"}, path), name=name)
            op = _pick(method, {"GET": "get_key", "PATCH": "update_key"}, path)
            return Route(op, name=name, version=second)
        if len(rest) == 3 and rest[2].lower() in CRYPTO_OPS:  # /keys/{n}/{v}/{op}
            return Route(
                _pick(method, {"POST": "key_operation"}, path),
                name=name,
                version=second,
                crypto_op=CRYPTO_OPS[rest[2].lower()],
            )
    if segs and segs[0].lower() == "deletedkeys":
        rest = segs[1:]
        if not rest or rest == [""]:
            return Route(_pick(method, {"GET": "list_deleted_keys"}, path))
        if len(rest) == 1:
            op = _pick(method, {"GET": "get_deleted_key", "DELETE": "purge_deleted_key"}, path)
            return Route(op, name=rest[0])
        if len(rest) == 2 and rest[1] == "recover":  # /deletedkeys/{n}/recover
            return Route(_pick(method, {"POST": "recover_deleted_key"}, path), name=rest[0])
    if segs == ["rng"]:
        return Route(_pick(method, {"POST": "get_random_bytes"}, path))
    raise PathNotFoundError(f"{path} is not part of the Key Vault keys API served by this emulator")
