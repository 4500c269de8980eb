"""Settings: read from the environment on demand, validated, with clear errors."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from byok_pipeline.core.errors import ConfigError
from byok_pipeline.core.settings import DEFAULTS, Settings
from managed_hsm_emulator.testing import EmulatorHandle

HSM = {"BYOK_HSM_URL": "https://contoso.managedhsm.azure.net/"}


def test_defaults_and_overrides() -> None:
    s = Settings.from_env(
        {**HSM, "BYOK_RETRY_BACKOFF_SECONDS": "0.25", "BYOK_ALLOWED_KEK_NAMES": "a, b,"}
    )
    assert s.hsm_url == "https://contoso.managedhsm.azure.net"
    assert s.hsm_host == "contoso.managedhsm.azure.net"
    assert s.max_package_bytes == int(DEFAULTS["BYOK_MAX_PACKAGE_BYTES"])
    assert s.retry_backoff == 0.25
    assert s.allowed_kek_names == frozenset({"a", "b"})
    assert Settings.from_env(HSM, BYOK_INCOMING_CONTAINER="other").incoming_container == "other"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "BYOK_HSM_URL must be set"),
        ({"BYOK_HSM_URL": "http://contoso.managedhsm.azure.net"}, "BYOK_HSM_URL must be set"),
        ({"BYOK_HSM_URL": "https://contoso.managedhsm.azure.net/keys"}, "BYOK_HSM_URL must be set"),
        ({**HSM, "BYOK_LEASE_SECONDS": "2.5"}, "must be an integer"),
        ({**HSM, "BYOK_LEASE_SECONDS": "61"}, "between 15 and 60"),
        ({**HSM, "BYOK_RETRY_BACKOFF_SECONDS": "soon"}, "must be a number"),
        ({**HSM, "BYOK_ALLOWED_TARGET_TYPES": "rsa-1024"}, "unknown type"),
    ],
)
def test_invalid_settings_are_refused_clearly(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_storage_only_commands_need_no_hsm() -> None:
    assert Settings.from_env({}, require_hsm=False).hsm_url == ""
    with pytest.raises(ConfigError):
        Settings.from_env({"BYOK_HSM_URL": "not a url"}, require_hsm=False)


def test_sdk_clients_skip_the_environment_scan_unless_a_proxy_is_set() -> None:
    from byok_pipeline.processing.wiring import env_settings_kwargs

    linux = {"platform": "linux"}
    off = {"use_env_settings": False}
    assert env_settings_kwargs({"PATH": "/usr/bin"}, **linux) == off
    for name in ("HTTPS_PROXY", "https_proxy", "Https_Proxy", "NO_PROXY", "ftp_proxy"):
        assert env_settings_kwargs({name: "x"}, **linux) == {}, name
        assert env_settings_kwargs({name: "x"}, **linux, verify="ca.pem") == {
            "connection_verify": "ca.pem"
        }
    assert env_settings_kwargs({}, platform="win32") == {}  # system proxy settings count there
    # the CA bundle requests would have read is passed on, in requests' order; a caller's own
    # CA wins, as in requests; a spelling requests does not read is not read here either
    both = {"CURL_CA_BUNDLE": "curl.pem", "REQUESTS_CA_BUNDLE": "req.pem"}
    assert env_settings_kwargs(both, **linux) == {**off, "connection_verify": "req.pem"}
    assert env_settings_kwargs({"CURL_CA_BUNDLE": "curl.pem"}, **linux) == {
        **off,
        "connection_verify": "curl.pem",
    }
    assert env_settings_kwargs(both, **linux, verify="own.pem") == {
        **off,
        "connection_verify": "own.pem",
    }
    assert env_settings_kwargs({"requests_ca_bundle": "x.pem"}, **linux) == off


def test_a_ca_bundle_variable_is_still_honoured_without_the_scan(
    monkeypatch: pytest.MonkeyPatch, hsm: EmulatorHandle, kek_name: str
) -> None:
    """The emulator's TLS certificate chains to its own CA, which no system store trusts: a
    KeyClient built the pipeline's way reaches it only when the REQUESTS_CA_BUNDLE naming that
    CA is still used with the environment scan off; with the variable gone it fails."""
    from azure.core.exceptions import ServiceRequestError

    from byok_pipeline.processing.wiring import key_client

    for name in [n for n in os.environ if n.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    settings = replace(Settings.from_env({"BYOK_HSM_URL": hsm.url}), retry_total=0)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(hsm.ca))
    client = key_client(settings, hsm.credential())
    assert client.get_key(kek_name).name == kek_name
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    with pytest.raises(ServiceRequestError):
        key_client(settings, hsm.credential()).get_key(kek_name)
