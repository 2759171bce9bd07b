"""Source credentials: Secret and environment parsing, redaction, and the git environment
(checked by asking real git what configuration it sees)."""

from __future__ import annotations

import base64
import os
import stat
import tempfile
from pathlib import Path

import git
import pytest

from reconciler.source_auth import (
    Credentials,
    SourceError,
    config_env,
    credentials_from_env,
    credentials_from_secret,
    git_environment,
    redact,
    register_secret,
    split_url_credentials,
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_secret_data_becomes_credentials() -> None:
    data = {
        "username": b64("deploy\n"),
        "password": b64("pa55-word-1\n"),
        "ca.crt": b64("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"),
        "identity": b64("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n"),
        "known_hosts": b64("[127.0.0.1]:2222 ssh-ed25519 AAAA\n"),
        "unrelated": b64("ignored"),
    }
    c = credentials_from_secret(data, name="ns/underlay-git-credentials")
    assert (c.username, c.password) == ("deploy", "pa55-word-1")
    assert c.ca_cert is not None and c.ca_cert.startswith("-----BEGIN CERTIFICATE-----")
    assert c.identity is not None and c.known_hosts == "[127.0.0.1]:2222 ssh-ed25519 AAAA\n"
    assert c.authorization() == "Basic " + b64("deploy:pa55-word-1")
    assert "pa55-word-1" not in repr(c) and "OPENSSH" not in repr(c)
    assert c.origin == "Secret ns/underlay-git-credentials"


def test_token_alone_is_bearer_and_with_username_is_basic() -> None:
    assert credentials_from_secret({"token": b64("tok-123456")}).authorization() == (
        "Bearer tok-123456"
    )
    c = credentials_from_secret({"username": b64("x-access-token"), "token": b64("tok-123456")})
    assert c.authorization() == "Basic " + b64("x-access-token:tok-123456")
    assert credentials_from_secret({"ca.crt": b64("pem")}).authorization() is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"password": "%%%not-base64"}, "key 'password' is not base64 of UTF-8 text"),
        ({"token": base64.b64encode(b"\xff\xfe").decode()}, "key 'token' is not base64"),
        (
            {"username": b64("u"), "password": b64("pw-value-1"), "token": b64("tk-value-1")},
            "set either 'password' or 'token', not both",
        ),
        ({"password": b64("pw-value-2")}, "'password' needs 'username'"),
    ],
)
def test_bad_secret_is_a_clear_error_without_the_value(data: dict[str, str], message: str) -> None:
    with pytest.raises(SourceError) as err:
        credentials_from_secret(data, name="ns/creds")
    text = str(err.value)
    assert message in text and text.startswith("Secret ns/creds: ")
    for v in ("%%%not-base64", "pw-value-1", "tk-value-1", "pw-value-2"):
        assert v not in text


def test_environment_credentials(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("PEM\n")
    env = {
        "UNDERLAY_GIT_USERNAME": "bot",
        "UNDERLAY_GIT_PASSWORD": "env-secret-9",
        "UNDERLAY_GIT_CA_FILE": str(tmp_path / "ca.crt"),
    }
    c = credentials_from_env(env)
    assert c is not None and (c.username, c.password, c.ca_cert) == ("bot", "env-secret-9", "PEM\n")
    assert credentials_from_env({}) is None
    with pytest.raises(SourceError, match=r"UNDERLAY_GIT_IDENTITY_FILE=/nonexistent: cannot read"):
        credentials_from_env({"UNDERLAY_GIT_IDENTITY_FILE": "/nonexistent"})


def test_secret_over_environment_keeps_http_credentials_together() -> None:
    env = Credentials(username="envuser", password="env-pass-1", ca_cert="ENVCA")
    secret = Credentials(token="secret-token-1")
    m = secret.merged(env)
    assert (m.username, m.password, m.token, m.ca_cert) == (None, None, "secret-token-1", "ENVCA")
    assert Credentials(ca_cert="X").merged(env).password == "env-pass-1"


def test_redact_hides_urls_headers_params_and_known_values() -> None:
    register_secret("registered-value-77")
    text = (
        "fatal: https://bob:hunter2@git.example.com/r.git "
        "Authorization: Basic Ym9iOmh1bnRlcjI= "
        "authorization=Bearer abc.def-ghi "
        "GET /r?access_token=tok42&x=1 "
        "also registered-value-77 and registered%2Dvalue? and given-secret-5"
    )
    out = redact(text, ["given-secret-5"])
    for leaked in ("hunter2", "bob:", "Ym9iOmh1bnRlcjI=", "abc.def-ghi", "tok42"):
        assert leaked not in out
    assert "registered-value-77" not in out and "given-secret-5" not in out
    assert "https://***@git.example.com/r.git" in out
    assert "Authorization: Basic ***" in out and "access_token=***&x=1" in out
    assert redact("no secrets here: https://git.example.com/r.git") == (
        "no secrets here: https://git.example.com/r.git"
    )


def test_private_key_lines_are_hidden() -> None:
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUA\nAAAEbm9uZQAAAAAAAAAB\n-----END"
    Credentials(identity=key)
    out = redact("Load key: b3BlbnNzaC1rZXktdjEAAAAABG5vbmUA failed; AAAEbm9uZQAAAAAAAAAB")
    assert out == "Load key: *** failed; ***"


def test_percent_encoded_secret_is_hidden_too() -> None:
    Credentials(username="u", password="p@ss/word:1")
    assert "p%40ss%2Fword%3A1" not in redact("https://host/?x=p%40ss%2Fword%3A1")
    assert "p@ss/word:1" not in redact("the password p@ss/word:1 was wrong")


def test_split_url_credentials() -> None:
    url, c = split_url_credentials("https://bob:se%2Fcret-1@git.example.com:8443/o/r.git")
    assert url == "https://git.example.com:8443/o/r.git"
    assert c is not None and (c.username, c.password) == ("bob", "se/cret-1")
    url, c = split_url_credentials("https://ghp_token123@github.com/o/r")
    assert url == "https://github.com/o/r" and c is not None and c.token == "ghp_token123"
    assert split_url_credentials("https://github.com/o/r") == ("https://github.com/o/r", None)
    assert split_url_credentials("ssh://git@host:22/r.git") == ("ssh://git@host:22/r.git", None)
    assert split_url_credentials("ssh://git:pw-ssh-1@host/r.git") == ("ssh://git@host/r.git", None)
    assert split_url_credentials("git@github.com:o/r.git") == ("git@github.com:o/r.git", None)
    url, _ = split_url_credentials("https://u:p@[::1]:8443/r")
    assert url == "https://[::1]:8443/r"


def git_config(env: dict[str, str], key: str) -> str:
    """What real git reads for ``key`` with ``env`` (no repository needed)."""
    return str(git.Git().config("--get-all", key, env=env)).strip()


def test_git_environment_gives_git_the_config_and_private_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    creds = Credentials(
        username="u",
        password="pw-env-test-1",
        ca_cert="-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----",
        identity="-----BEGIN OPENSSH PRIVATE KEY-----\r\nkey\r\n",
        known_hosts="host ssh-ed25519 AAAA",
    )
    with git_environment(creds) as env:
        header = git_config(env, "http.extraHeader")
        assert header == "Authorization: Basic " + b64("u:pw-env-test-1")
        ca = Path(git_config(env, "http.sslCAInfo"))
        assert ca.read_text().endswith("-----END CERTIFICATE-----\n")
        ssh = env["GIT_SSH_COMMAND"]
        assert "StrictHostKeyChecking=yes" in ssh and "IdentitiesOnly=yes" in ssh
        assert "BatchMode=yes" in ssh and "GlobalKnownHostsFile=/dev/null" in ssh
        assert "pw-env-test-1" not in ssh
        (private,) = list(tmp_path.iterdir())
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in private.iterdir()}
        assert files == {"ca.crt": 0o600, "identity": 0o600, "known_hosts": 0o600}
        assert (private / "identity").read_text() == "-----BEGIN OPENSSH PRIVATE KEY-----\nkey\n"
        assert f"UserKnownHostsFile={private / 'known_hosts'}" in ssh
        assert env["GIT_TERMINAL_PROMPT"] == "0"
        assert git_config(env, "credential.helper") == ""
    assert list(tmp_path.iterdir()) == [], "private files are removed after the git command"

    with pytest.raises(RuntimeError), git_environment(creds):
        raise RuntimeError("git failed")
    assert list(tmp_path.iterdir()) == [], "and also when it fails"


def test_git_environment_keeps_config_entries_already_in_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", "safe.directory")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", "/srv/x")
    with git_environment(Credentials(token="tok-keep-1")) as env:
        assert env["GIT_CONFIG_COUNT"] == "3"
        assert git_config(env, "safe.directory") == "/srv/x"
        assert git_config(env, "http.extraHeader") == "Authorization: Bearer tok-keep-1"
    assert config_env([], {})["GIT_CONFIG_COUNT"] == "0"


def test_no_credentials_still_checks_host_keys_strictly() -> None:
    with git_environment(None) as env:
        assert "StrictHostKeyChecking=yes" in env["GIT_SSH_COMMAND"]
        assert "-i" not in env["GIT_SSH_COMMAND"].split()
        assert env["GIT_CONFIG_COUNT"] == os.environ.get("GIT_CONFIG_COUNT", "0")
