"""The Git source against a real smart-HTTP server over TLS on 127.0.0.1.

The server is ``git http-backend`` (git's own CGI program) behind a small Python https server
that demands HTTP Basic or Bearer credentials, with a certificate signed by a CA the test makes
with the ``openssl`` command. Nothing is faked: git-remote-https speaks to it over TLS.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import ssl
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import git
import pytest

from reconciler.source import Credentials, SourceError, fetch, ls_remote
from tests.unit.test_source import commit, exception_texts, make_repo

USER, PASSWORD, TOKEN = "deploy", "pw-Zq81-http", "tok-9f3k-bearer-77"


def openssl(*args: str, cwd: Path) -> None:
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"openssl {args}: {p.stderr}"


def make_ca_and_server_cert(d: Path) -> None:
    """ca.crt/ca.key (a CA) and srv.crt/srv.key for IP 127.0.0.1 signed by it."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=underlay test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)  # fmt: skip
    openssl("req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "srv.crt", "-days", "2", "-extfile", "ext.cnf", cwd=d)  # fmt: skip


@dataclass
class GitHTTPS:
    """A running server: ``url(name)`` of a repository under ``root``; what it saw."""

    port: int
    root: Path
    ca_pem: str
    accepted: set[str]
    authorizations: list[str | None] = field(default_factory=list)
    argv_leaks: list[str] = field(default_factory=list)
    tmp_modes: list[dict[str, int]] = field(default_factory=list)
    watch_tmp: Path | None = None

    def url(self, name: str) -> str:
        return f"https://127.0.0.1:{self.port}/{name}"


def _scan_argv(secrets: list[str]) -> list[str]:
    """Command lines of every process on the machine that contain one of ``secrets``."""
    leaks = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        leaks += [cmdline for s in secrets if s in cmdline]
    return leaks


def _handler(srv: GitHTTPS) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.serve()

        def do_POST(self) -> None:
            self.serve()

        def body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def serve(self) -> None:
            auth = self.headers.get("Authorization")
            srv.authorizations.append(auth)
            if srv.watch_tmp is not None:  # while git is connected: secrets in any argv?
                srv.argv_leaks += _scan_argv(
                    [PASSWORD, TOKEN, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()]
                )
            if srv.watch_tmp is not None:
                srv.tmp_modes.append(
                    {
                        str(p.relative_to(srv.watch_tmp)): stat.S_IMODE(p.stat().st_mode)
                        for p in srv.watch_tmp.rglob("*")
                    }
                )
            data = self.body()
            if auth not in srv.accepted:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            path, _, query = self.path.partition("?")
            env = {
                "PATH": os.environ["PATH"],
                "GIT_PROJECT_ROOT": str(srv.root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "REQUEST_METHOD": self.command,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(data)),
                "REMOTE_ADDR": "127.0.0.1",
                "REMOTE_USER": USER,
            }
            if self.headers.get("Git-Protocol"):
                env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
            if self.headers.get("Content-Encoding"):
                env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
            p = subprocess.run(["git", "http-backend"], input=data, env=env, capture_output=True)
            sep = b"\r\n\r\n" if b"\r\n\r\n" in p.stdout else b"\n\n"
            head, _, payload = p.stdout.partition(sep)
            status = 200
            headers = []
            for line in head.decode().splitlines():
                name, _, value = line.partition(":")
                if name.lower() == "status":
                    status = int(value.split()[0])
                elif name:
                    headers.append((name, value.strip()))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def https_git(tmp_path: Path) -> Iterator[GitHTTPS]:
    if not shutil.which("openssl") or not Path("/usr/lib/git-core/git-http-backend").exists():
        if os.environ.get("UNDERLAY_REQUIRE_RIG") == "1":
            pytest.fail("openssl and git-http-backend (package git) are required")
        pytest.skip("openssl or git-http-backend missing")
    certs = tmp_path / "pki"
    certs.mkdir()
    make_ca_and_server_cert(certs)
    root = tmp_path / "served"
    root.mkdir()
    accepted = {
        "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
        f"Bearer {TOKEN}",
        "Basic " + base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode(),
    }
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / "srv.crt", certs / "srv.key")
    state = GitHTTPS(0, root, (certs / "ca.crt").read_text(), accepted)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    state.port = httpd.server_address[1]
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


def publish(server: GitHTTPS, tmp_path: Path, name: str = "r.git") -> tuple[git.Repo, Path]:
    """A work repository and its bare copy served as ``name``; push with ``push(work)``."""
    work = make_repo(tmp_path / "work")
    commit(work, {"pools/a.yaml": "one\n"}, "first")
    bare = server.root / name
    git.Repo.clone_from(str(tmp_path / "work"), str(bare), bare=True)
    work.create_remote("served", str(bare))
    return work, bare


def push(work: git.Repo) -> None:
    work.git.push("served", "main")


def test_basic_auth_and_custom_ca(https_git: GitHTTPS, tmp_path: Path) -> None:
    work, _ = publish(https_git, tmp_path)
    creds = Credentials(username=USER, password=PASSWORD, ca_cert=https_git.ca_pem)
    url = https_git.url("r.git")
    head = work.head.commit.hexsha
    assert ls_remote(url, "main", credentials=creds) == head
    co = fetch(url, "main", cache_dir=tmp_path / "cache", credentials=creds)
    assert (co.revision, co.url) == (head, url)
    assert (co.path / "pools" / "a.yaml").read_text() == "one\n"
    assert len(list(git.Repo(co.path).iter_commits("HEAD"))) == 1, "shallow over smart HTTP"
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert https_git.authorizations and set(https_git.authorizations) == {basic}, (
        "credentials are sent on the first request (no anonymous round trip)"
    )
    second = commit(work, {"pools/a.yaml": "two\n"}, "second")
    push(work)
    assert ls_remote(url, "main", credentials=creds) == second
    co = fetch(url, "main", cache_dir=tmp_path / "cache", credentials=creds)
    assert co.revision == second and co.changed


def test_bearer_token_and_token_in_url_never_reach_disk_or_argv(
    https_git: GitHTTPS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work, _ = publish(https_git, tmp_path)
    private_tmp = tmp_path / "tmpdir"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    https_git.watch_tmp = private_tmp
    url = https_git.url("r.git")
    ca = Credentials(ca_cert=https_git.ca_pem)

    co = fetch(
        url,
        "main",
        cache_dir=tmp_path / "cache",
        credentials=Credentials(token=TOKEN, ca_cert=https_git.ca_pem),
    )
    assert co.revision == work.head.commit.hexsha
    assert f"Bearer {TOKEN}" in https_git.authorizations

    # a token written into the URL works too, and is taken out of the URL before git sees it
    with_token = url.replace("https://", f"https://x-access-token:{TOKEN}@")
    co2 = fetch(with_token, "main", cache_dir=tmp_path / "cache", credentials=ca)
    assert co2.path == co.path and co2.url == url
    assert ls_remote(with_token, "main", credentials=ca) == co.revision

    assert https_git.argv_leaks == [], "no secret in any process's command line"
    for snapshot in https_git.tmp_modes:  # taken while git was connected
        for name, mode in snapshot.items():
            assert mode == (0o600 if "/" in name else 0o700), (name, oct(mode))
    assert any(k.endswith("/ca.crt") for m in https_git.tmp_modes for k in m)
    assert list(private_tmp.iterdir()) == [], "the CA file is removed after each command"
    for p in (tmp_path / "cache").rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), f"token stored in {p}"


def test_wrong_password_fails_without_showing_it_anywhere(
    https_git: GitHTTPS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    publish(https_git, tmp_path)
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-pw-4477"
    creds = Credentials(username=USER, password=wrong, ca_cert=https_git.ca_pem)
    with pytest.raises(SourceError) as err:
        fetch(https_git.url("r.git"), "main", cache_dir=tmp_path / "c", credentials=creds)
    text = str(err.value)
    assert text.startswith(
        f"cannot fetch 'main' from {https_git.url('r.git')}: https authentication failed"
    )
    with pytest.raises(SourceError) as err2:
        ls_remote(https_git.url("r.git"), "main", credentials=creds)
    assert "https authentication failed" in str(err2.value)
    header = base64.b64encode(f"{USER}:{wrong}".encode()).decode()
    everything = exception_texts(err.value) + exception_texts(err2.value) + caplog.text
    assert wrong not in everything and header not in everything
    assert any("git" in r.name for r in caplog.records), "gitpython's debug log was captured"

    # the same with the token in the URL: gitpython's GitCommandError text must not have it
    bad_url = https_git.url("r.git").replace("https://", "https://x-access-token:bad-tok-5566@")
    with pytest.raises(SourceError) as err3:
        fetch(
            bad_url,
            "main",
            cache_dir=tmp_path / "c",
            credentials=Credentials(ca_cert=https_git.ca_pem),
        )
    cause = err3.value.__cause__
    assert isinstance(cause, git.GitCommandError) and cause.status == 128
    assert cause.command[:2] == ["git", "fetch"] and "could not read Username" in str(cause)
    assert "bad-tok-5566" not in exception_texts(err3.value) + caplog.text


def test_no_credentials_is_an_authentication_error(https_git: GitHTTPS, tmp_path: Path) -> None:
    publish(https_git, tmp_path)
    with pytest.raises(SourceError, match="https authentication failed"):
        fetch(
            https_git.url("r.git"),
            "main",
            cache_dir=tmp_path / "c",
            credentials=Credentials(ca_cert=https_git.ca_pem),
        )


def test_untrusted_certificate_is_refused(https_git: GitHTTPS, tmp_path: Path) -> None:
    publish(https_git, tmp_path)
    with pytest.raises(SourceError) as err:
        fetch(
            https_git.url("r.git"),
            "main",
            cache_dir=tmp_path / "c",
            credentials=Credentials(username=USER, password=PASSWORD),
        )
    assert "the server's TLS certificate is not trusted: set ca.crt" in str(err.value)
    assert https_git.authorizations == [], "no credential is sent before the server is trusted"
    other = tmp_path / "other"
    other.mkdir()
    make_ca_and_server_cert(other)
    with pytest.raises(SourceError, match="TLS certificate is not trusted"):
        ls_remote(
            https_git.url("r.git"),
            "main",
            credentials=Credentials(token=TOKEN, ca_cert=(other / "ca.crt").read_text()),
        )


def test_missing_repository_and_ref(https_git: GitHTTPS, tmp_path: Path) -> None:
    publish(https_git, tmp_path)
    creds = Credentials(token=TOKEN, ca_cert=https_git.ca_pem)
    with pytest.raises(
        SourceError, match=r"ref 'nope' not found on https://127\.0\.0\.1:\d+/r\.git"
    ):
        ls_remote(https_git.url("r.git"), "nope", credentials=creds)
    with pytest.raises(
        SourceError, match=r"cannot fetch 'nope' from https://127\.0\.0\.1:\d+/r\.git"
    ):
        fetch(https_git.url("r.git"), "nope", cache_dir=tmp_path / "c", credentials=creds)
    with pytest.raises(
        SourceError, match=r"cannot list 'main' on https://127\.0\.0\.1:\d+/gone\.git"
    ):
        ls_remote(https_git.url("gone.git"), "main", credentials=creds)


def test_credentials_from_the_environment_by_default(
    https_git: GitHTTPS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``underlay apply --repo https://...`` gets without a Secret: UNDERLAY_GIT_* vars."""
    work, _ = publish(https_git, tmp_path)
    (tmp_path / "ca.crt").write_text(https_git.ca_pem)
    monkeypatch.setenv("UNDERLAY_GIT_TOKEN", TOKEN)
    monkeypatch.setenv("UNDERLAY_GIT_CA_FILE", str(tmp_path / "ca.crt"))
    url = https_git.url("r.git")
    assert ls_remote(url, "main") == work.head.commit.hexsha
    assert fetch(url, "main", cache_dir=tmp_path / "c").revision == work.head.commit.hexsha
    assert https_git.authorizations[-1] == f"Bearer {TOKEN}"
    # explicit credentials replace the environment's
    with pytest.raises(SourceError, match="https authentication failed"):
        ls_remote(
            url, "main", credentials=Credentials(token="other-token-1", ca_cert=https_git.ca_pem)
        )


def test_pinned_commit_and_tag_over_https(https_git: GitHTTPS, tmp_path: Path) -> None:
    work, _ = publish(https_git, tmp_path)
    first = work.head.commit.hexsha
    work.create_tag("v1", message="release v1")
    commit(work, {"pools/a.yaml": "two\n"}, "second")
    work.git.push("served", "main", "v1")
    creds = Credentials(token=TOKEN, ca_cert=https_git.ca_pem)
    url = https_git.url("r.git")
    before = len(https_git.authorizations)
    co = fetch(url, first, cache_dir=tmp_path / "c", credentials=creds)
    assert co.revision == first and (co.path / "pools" / "a.yaml").read_text() == "one\n"
    assert len(https_git.authorizations) - before <= 3, "a full SHA is fetched in one go"
    assert ls_remote(url, "v1", credentials=creds) == first
    assert fetch(url, "v1", cache_dir=tmp_path / "c", credentials=creds).revision == first


def test_hung_server_times_out(tmp_path: Path) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the TCP connection, never answers the TLS handshake
    port = listener.getsockname()[1]
    try:
        with pytest.raises(SourceError, match="git timed out"):
            ls_remote(f"https://127.0.0.1:{port}/r.git", "main", timeout=1.5)
        with pytest.raises(SourceError, match=r"cannot fetch 'main' from .*: git timed out"):
            fetch(f"https://127.0.0.1:{port}/r.git", "main", cache_dir=tmp_path / "c", timeout=1.5)
    finally:
        listener.close()
