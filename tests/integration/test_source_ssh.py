"""The Git source against a real OpenSSH server (Debian openssh-server) on 127.0.0.1.

sshd runs with its own config and host key on a free port; the only authorized key may run
nothing but ``git-shell`` (forced command). The client is git with the GIT_SSH_COMMAND the
source builds: key file, known_hosts file, strict host key checking.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import git
import pytest

from reconciler.source import Credentials, SourceError, fetch, ls_remote
from tests.unit.test_source import commit, exception_texts, make_repo

SSHD = "/usr/sbin/sshd"


def keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
    )
    return Path(f"{path}.pub").read_text().strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SSHServer:
    port: int
    dir: Path
    host_pub: str  # "ssh-ed25519 AAAA..."
    client_key: str  # private key text (an authorized key)
    watch_log: Path  # the forced command writes modes of files under $UNDERLAY_WATCH here

    def url(self, repo: Path) -> str:
        return f"ssh://{getpass.getuser()}@127.0.0.1:{self.port}{repo}"

    def known_hosts(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_pub}\n"


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SSHServer]:
    if not Path(SSHD).exists() or not shutil.which("ssh") or not shutil.which("git-shell"):
        if os.environ.get("UNDERLAY_REQUIRE_RIG") == "1":
            pytest.fail("openssh-server, openssh-client and git are required (apt-get install)")
        pytest.skip("openssh-server not installed")
    d = tmp_path / "sshd"
    d.mkdir()
    host_pub = " ".join(keygen(d / "host_key").split()[:2])
    client_pub = keygen(d / "client_key")
    watch_log = d / "watch.log"
    wrapper = d / "forced.sh"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'for f in "{tmp_path}"/tmpdir/*/ "{tmp_path}"/tmpdir/*/*; do\n'
        f'  [ -e "$f" ] && stat -c "%a %n" "$f" >> "{watch_log}"\n'
        "done\n"
        'exec git-shell -c "$SSH_ORIGINAL_COMMAND"\n'
    )
    wrapper.chmod(0o755)
    (d / "authorized_keys").write_text(f'command="{wrapper}",restrict {client_pub}\n')
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"PidFile {d / 'sshd.pid'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        f"PermitRootLogin prohibit-password\nAllowUsers {getpass.getuser()}\nLogLevel ERROR\n"
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sshd exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("sshd did not listen within 10 s")
                time.sleep(0.05)
        yield SSHServer(port, d, host_pub, (d / "client_key").read_text(), watch_log)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def origin_repo(tmp_path: Path) -> tuple[git.Repo, Path]:
    work = make_repo(tmp_path / "work")
    commit(work, {"a.yaml": "one\n"}, "first")
    bare = tmp_path / "origin.git"
    git.Repo.clone_from(str(tmp_path / "work"), str(bare), bare=True)
    work.create_remote("origin", str(bare))
    return work, bare


def test_key_and_known_hosts(
    sshd: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work, bare = origin_repo(tmp_path)
    (tmp_path / "tmpdir").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmpdir"))
    creds = Credentials(identity=sshd.client_key, known_hosts=sshd.known_hosts())
    url = sshd.url(bare)
    head = work.head.commit.hexsha
    assert ls_remote(url, "main", credentials=creds) == head
    co = fetch(url, "main", cache_dir=tmp_path / "cache", credentials=creds)
    assert (co.revision, co.url) == (head, url)
    assert (co.path / "a.yaml").read_text() == "one\n"
    assert len(list(git.Repo(co.path).iter_commits("HEAD"))) == 1, "shallow over ssh"
    second = commit(work, {"a.yaml": "two\n"}, "second")
    work.git.push("origin", "main")
    assert ls_remote(url, "main", credentials=creds) == second
    assert fetch(url, "main", cache_dir=tmp_path / "cache", credentials=creds).revision == second

    # while git was connected the key and known_hosts were 0600 files in a 0700 directory
    seen = sshd.watch_log.read_text().splitlines()
    modes = {line.split()[1].rstrip("/").rsplit("/", 1)[-1]: line.split()[0] for line in seen}
    assert {k: v for k, v in modes.items() if k in ("identity", "known_hosts")} == {
        "identity": "600",
        "known_hosts": "600",
    }, seen
    assert all(m == "700" for line in seen if line.endswith("/") for m in [line.split()[0]])
    assert list((tmp_path / "tmpdir").iterdir()) == [], "key files are removed after use"
    for p in (tmp_path / "cache").rglob("*"):
        if p.is_file():
            assert b"PRIVATE KEY" not in p.read_bytes(), p


def test_changed_host_key_is_refused(sshd: SSHServer, tmp_path: Path) -> None:
    _, bare = origin_repo(tmp_path)
    impostor = " ".join(keygen(tmp_path / "impostor").split()[:2])
    creds = Credentials(
        identity=sshd.client_key, known_hosts=f"[127.0.0.1]:{sshd.port} {impostor}\n"
    )
    with pytest.raises(SourceError) as err:
        fetch(sshd.url(bare), "main", cache_dir=tmp_path / "cache", credentials=creds)
    assert str(err.value).startswith(
        f"cannot fetch 'main' from {sshd.url(bare)}: the ssh host key does not match known_hosts"
    )
    assert "refusing to connect" in str(err.value)
    cache = git.Repo(next((tmp_path / "cache").iterdir()))
    assert "refs/underlay/target" not in [r.path for r in cache.refs], "nothing was fetched"
    with pytest.raises(SourceError, match="ssh host key does not match known_hosts"):
        ls_remote(sshd.url(bare), "main", credentials=creds)
    assert "PRIVATE KEY" not in exception_texts(err.value)


def test_unknown_host_is_refused(sshd: SSHServer, tmp_path: Path) -> None:
    _, bare = origin_repo(tmp_path)
    other_host = f"[127.0.0.1]:{sshd.port + 1} {sshd.host_pub}\n"  # same key, another address
    creds = Credentials(identity=sshd.client_key, known_hosts=other_host)
    with pytest.raises(SourceError, match="the ssh host is not in known_hosts"):
        fetch(sshd.url(bare), "main", cache_dir=tmp_path / "cache", credentials=creds)
    # without known_hosts the user's default file is used, still strictly: never learnt silently
    home_kh = Path(os.path.expanduser("~/.ssh/known_hosts"))
    before = home_kh.read_bytes() if home_kh.exists() else None
    with pytest.raises(SourceError, match="the ssh host is not in known_hosts"):
        ls_remote(sshd.url(bare), "main", credentials=Credentials(identity=sshd.client_key))
    assert (home_kh.read_bytes() if home_kh.exists() else None) == before


def test_wrong_identity_is_refused(sshd: SSHServer, tmp_path: Path) -> None:
    _, bare = origin_repo(tmp_path)
    keygen(tmp_path / "stranger")
    creds = Credentials(
        identity=(tmp_path / "stranger").read_text(), known_hosts=sshd.known_hosts()
    )
    with pytest.raises(SourceError) as err:
        fetch(sshd.url(bare), "main", cache_dir=tmp_path / "cache", credentials=creds)
    assert "ssh authentication failed: the server refused the identity key" in str(err.value)
    body = (tmp_path / "stranger").read_text().splitlines()[1]
    assert body not in exception_texts(err.value)
    broken = Credentials(identity="not a key\n", known_hosts=sshd.known_hosts())
    with pytest.raises(SourceError, match="not a valid private key"):
        ls_remote(sshd.url(bare), "main", credentials=broken)


def test_private_files_are_0600(tmp_path: Path) -> None:
    """Complements the live check above: mode bits survive a permissive umask."""
    from reconciler.source_auth import git_environment

    old = os.umask(0)
    try:
        with git_environment(Credentials(identity="k", known_hosts="h")) as env:
            key = Path(env["GIT_SSH_COMMAND"].split(" -i ", 1)[1].split()[0])
            assert stat.S_IMODE(key.stat().st_mode) == 0o600
            assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    finally:
        os.umask(old)
