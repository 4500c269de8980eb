"""``EmulatorCredential``: an azure-core ``TokenCredential`` whose tokens the emulator accepts."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError

from offline_packager.secret import SecretBytes

from .datadir import DataDir
from .tokens import TOKEN_KEY_BYTES, audience_for_scope, mint_token

DEFAULT_LIFETIME_SECONDS = 3600


class EmulatorCredential:
    """Mints tokens signed with ``DIR/token.key`` for the emulator serving ``data_dir``.

    Use it wherever the SDK wants a credential::

        KeyClient(url, EmulatorCredential(DIR), verify_challenge_resource=False,
                  connection_verify=ca_path)

    The token's audience is the requested scope without ``/.default``; the emulator accepts
    only ``https://managedhsm.azure.net``. ``clock`` and ``lifetime_seconds`` exist so tests can
    mint expired tokens.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        lifetime_seconds: int = DEFAULT_LIFETIME_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._paths = DataDir(Path(data_dir))
        self._lifetime = lifetime_seconds
        self._clock = clock
        self._key: SecretBytes | None = None

    def __repr__(self) -> str:
        return f"EmulatorCredential(data_dir={str(self._paths.root)!r})"

    def _signing_key(self) -> SecretBytes:
        if self._key is None:
            try:
                raw = self._paths.token_key.read_bytes()
            except OSError:
                raise ClientAuthenticationError(
                    message=f"no emulator token key in {self._paths.root}: start the emulator "
                    "with this --data-dir first"
                ) from None
            if len(raw) != TOKEN_KEY_BYTES:
                raise ClientAuthenticationError(message="the emulator token key is damaged")
            self._key = SecretBytes(raw, label="emulator token key")
        return self._key

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,  # noqa: ARG002  # part of the TokenCredential protocol
        tenant_id: str | None = None,  # noqa: ARG002  # part of the TokenCredential protocol
        enable_cae: bool = False,  # noqa: ARG002  # part of the TokenCredential protocol
        **kwargs: Any,  # noqa: ARG002  # part of the TokenCredential protocol
    ) -> AccessToken:
        """Return a token for the first scope.

        Raises:
            ClientAuthenticationError: no scope, or the data directory has no token key.
        """
        if not scopes:
            raise ClientAuthenticationError(message="get_token needs a scope")
        now = int(self._clock())
        token = mint_token(
            self._signing_key(),
            audience=audience_for_scope(scopes[0]),
            issued_at=now,
            lifetime_seconds=self._lifetime,
        )
        return AccessToken(token, now + self._lifetime)

    def close(self) -> None:
        """Forget the cached signing key."""
        if self._key is not None:
            self._key.wipe()
            self._key = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
