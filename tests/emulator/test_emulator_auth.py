"""Authentication as the real service does it: challenge first, then token checks."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
from azure.keyvault.keys import KeyClient
from emulator_support import secret_encodings

from managed_hsm_emulator import EmulatorCredential
from managed_hsm_emulator.testing import EmulatorHandle
from managed_hsm_emulator.tokens import AUDIENCE, SCOPE, TENANT_ID, mint_token
from offline_packager.secret import SecretBytes

CHALLENGE = (
    f'Bearer authorization="https://login.microsoftonline.com/{TENANT_ID}", resource="{AUDIENCE}"'
)


def _forged_token() -> str:
    return mint_token(
        SecretBytes(b"k" * 32), audience=AUDIENCE, issued_at=int(time.time()), lifetime_seconds=600
    )


def test_sdk_challenge_flow_then_token(hsm: EmulatorHandle) -> None:
    since = hsm.last_request_seq()
    client = hsm.key_client()
    key = client.create_ec_key("auth-flow", curve="P-256")
    assert key.name == "auth-flow"
    seen = hsm.requests_seen(since)
    assert [(e["status"], e["reason"]) for e in seen[:2]] == [(401, "no_token"), (200, None)]
    # the first request went without Authorization (reason no_token) and without its body,
    # then was resent, with the token and the body, as the same client request
    assert seen[0]["client_request_id"] == seen[1]["client_request_id"]
    assert seen[0]["path"] == seen[1]["path"] == "/keys/auth-flow/create"
    assert seen[0]["body_bytes"] == 0
    assert seen[1]["body_bytes"] > 0
    # later requests of the same client carry the cached token directly
    client.get_key("auth-flow")
    assert [e["status"] for e in hsm.requests_seen(since)[2:]] == [200]


def test_no_token_gets_the_managed_hsm_challenge_before_anything_else(hsm: EmulatorHandle) -> None:
    # an unknown path, no api-version, a bad body: still the challenge first
    resp = hsm.request("POST", "/nonsense", {"x": 1}, authenticated=False)
    assert resp.status == 401
    assert resp.headers["www-authenticate"] == CHALLENGE
    assert resp.body["error"]["code"] == "Unauthorized"


@pytest.mark.parametrize(
    ("token_kind", "reason"),
    [
        ("forged", "token_bad_signature"),
        ("expired", "token_expired"),
        ("wrong_audience", "token_wrong_audience"),
        ("garbage", "token_malformed"),
    ],
)
def test_bad_tokens_get_401(hsm: EmulatorHandle, token_kind: str, reason: str) -> None:
    if token_kind == "forged":
        token = _forged_token()
    elif token_kind == "expired":
        token = hsm.credential(clock=lambda: time.time() - 7200).get_token(SCOPE).token
    elif token_kind == "wrong_audience":
        token = hsm.credential().get_token("https://vault.azure.net/.default").token
    else:
        token = "not.a.token"
    resp = hsm.request("GET", "/keys?api-version=7.6", token=token)
    assert resp.status == 401
    assert resp.headers["www-authenticate"] == CHALLENGE
    assert resp.body["error"]["innererror"]["code"] == reason
    # and a good token works on the same path
    assert hsm.request("GET", "/keys?api-version=7.6").status == 200


class _ForgedCredential:
    def get_token(self, *scopes: str, **kwargs: object) -> object:  # noqa: ARG002  # credential protocol
        from azure.core.credentials import AccessToken

        return AccessToken(_forged_token(), int(time.time()) + 600)


def test_sdk_with_forged_or_expired_credential_fails(hsm: EmulatorHandle) -> None:
    for credential in (
        _ForgedCredential(),
        hsm.credential(clock=lambda: time.time() - 7200, lifetime_seconds=3600),
    ):
        client = hsm.key_client(credential=credential, retry_total=0)
        with pytest.raises((ClientAuthenticationError, HttpResponseError)) as exc:
            client.get_key("anything")
        assert exc.value.status_code == 401


def test_credential_without_emulator_data_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ClientAuthenticationError, match="start the emulator"):
        EmulatorCredential(tmp_path).get_token(SCOPE)


def test_credential_repr_shows_no_key(hsm: EmulatorHandle) -> None:
    cred = hsm.credential()
    cred.get_token(SCOPE)  # the key is loaded and cached now
    text = repr(cred)
    assert text == f"EmulatorCredential(data_dir={str(hsm.data_dir)!r})"
    key = (hsm.data_dir / "token.key").read_bytes()
    for how, needle in secret_encodings(key).items():
        assert needle.decode("latin-1") not in text, how


@pytest.mark.parametrize("api_version", ["7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01"])
def test_supported_api_versions_work_through_the_sdk(hsm: EmulatorHandle, api_version: str) -> None:
    client: KeyClient = hsm.key_client(api_version=api_version)
    key = client.create_rsa_key(f"api-{api_version.replace('.', '-')}", size=2048)
    assert key.name is not None
    assert client.get_key(key.name).id == key.id
    seen = hsm.requests_seen(hsm.last_request_seq() - 1)
    assert seen[-1]["api_version"] == api_version


@pytest.mark.parametrize("query", ["?api-version=7.1", "?api-version=2099-01-01", ""])
def test_other_api_versions_get_key_vaults_error_shape(hsm: EmulatorHandle, query: str) -> None:
    resp = hsm.request("GET", f"/keys{query}")
    assert resp.status == 400
    assert resp.body["error"]["code"] == "BadParameter"
    assert resp.body["error"]["innererror"]["code"] == "bad_api_version"
    assert isinstance(resp.body["error"]["message"], str)
