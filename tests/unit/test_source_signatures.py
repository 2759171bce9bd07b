"""Signature verification of the head commit on real signed commits.

SSH signatures are made by git itself (``gpg.format=ssh``, ssh-keygen -Y sign) and GPG ones with
keys generated in a private GNUPGHOME without passphrase; git verifies them (git verify-commit).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import git
import pytest

from reconciler.signatures import (
    Verification,
    dearmor_public_keys,
    verification_from_files,
    verification_from_secret,
)
from reconciler.source import SourceError, fetch
from tests.unit.test_source import make_repo


def need(tool: str) -> None:
    if shutil.which(tool):
        return
    if os.environ.get("UNDERLAY_REQUIRE_RIG") == "1":
        pytest.fail(f"{tool} is required (apt-get install {'gnupg' if tool == 'gpg' else tool})")
    pytest.skip(f"{tool} not installed")


def run(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"{argv}: {p.stderr}"
    return p.stdout


def signed_commit(
    repo: git.Repo,
    files: dict[str, str],
    msg: str,
    config: list[str],
    env: dict[str, str] | None = None,
) -> str:
    """Commit ``files`` with ``git commit -S`` under ``-c`` options ``config``; return the SHA."""
    root = Path(repo.working_tree_dir or ".")
    for name, text in files.items():
        (root / name).write_text(text)
        repo.index.add([name])
    args = [a for kv in config for a in ("-c", kv)]
    run("git", *args, "commit", "-q", "-S", "-m", msg, cwd=root, env=env)
    return str(repo.head.commit.hexsha)


def ssh_keypair(directory: Path, name: str) -> tuple[Path, str]:
    """A fresh ed25519 key; returns (private key path, public key line)."""
    need("ssh-keygen")
    key = directory / name
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key))
    return key, (directory / f"{name}.pub").read_text().strip()


def ssh_sign(key: Path) -> list[str]:
    return ["gpg.format=ssh", f"user.signingkey={key}"]


def tamper(repo: git.Repo) -> str:
    """Rewrite HEAD's message keeping its signature header; return the altered commit's SHA."""
    root = Path(repo.working_tree_dir or ".")
    raw = run("git", "cat-file", "commit", "HEAD", cwd=root)
    altered = raw.rstrip("\n") + " (altered)\n"
    p = subprocess.run(
        ["git", "hash-object", "-t", "commit", "-w", "--stdin"],
        cwd=root,
        input=altered,
        capture_output=True,
        text=True,
        check=True,
    )
    sha = p.stdout.strip()
    run("git", "update-ref", "refs/heads/main", sha, cwd=root)
    return sha


@pytest.fixture
def origin(tmp_path: Path) -> git.Repo:
    repo = make_repo(tmp_path / "origin")
    root = Path(repo.working_tree_dir or ".")
    (root / "a.yaml").write_text("unsigned\n")
    repo.index.add(["a.yaml"])
    repo.index.commit("unsigned first")
    return repo


def test_ssh_signed_head_is_accepted_and_reported(tmp_path: Path, origin: git.Repo) -> None:
    key, pub = ssh_keypair(tmp_path, "ops")
    sha = signed_commit(origin, {"a.yaml": "signed\n"}, "signed", ssh_sign(key))
    allowed = Verification(ssh_allowed_signers=f"ops@example.com {pub}\n")
    co = fetch(str(tmp_path / "origin"), "main", cache_dir=tmp_path / "c", verify=allowed)
    assert co.revision == sha
    assert (co.path / "a.yaml").read_text() == "signed\n"
    fp = run("ssh-keygen", "-lf", str(key) + ".pub").split()[1]
    assert co.signature == f"SSH ED25519 key {fp} (ops@example.com)"


def test_commit_signed_by_another_ssh_key_is_refused_and_nothing_changes(
    tmp_path: Path, origin: git.Repo
) -> None:
    good, pub = ssh_keypair(tmp_path, "ops")
    other, _ = ssh_keypair(tmp_path, "intruder")
    allowed = Verification(ssh_allowed_signers=f"ops@example.com {pub}\n")
    first = signed_commit(origin, {"a.yaml": "good\n"}, "good", ssh_sign(good))
    co = fetch(str(tmp_path / "origin"), "main", cache_dir=tmp_path / "c", verify=allowed)
    assert co.revision == first
    bad = signed_commit(origin, {"a.yaml": "evil\n"}, "evil", ssh_sign(other))
    with pytest.raises(SourceError) as err:
        fetch(str(tmp_path / "origin"), "main", cache_dir=tmp_path / "c", verify=allowed)
    assert str(err.value) == (
        f"commit {bad} of {(tmp_path / 'origin').resolve().as_uri()} (main): signature not "
        "verified: signed with an SSH key that is not in the allowed signers"
    )
    assert (co.path / "a.yaml").read_text() == "good\n", "work tree keeps the verified revision"
    assert git.Repo(co.path).head.commit.hexsha == first


def test_unsigned_commit_is_refused_naming_the_commit(tmp_path: Path, origin: git.Repo) -> None:
    _, pub = ssh_keypair(tmp_path, "ops")
    head = origin.head.commit.hexsha
    with pytest.raises(SourceError, match=rf"^commit {head} of .*: the commit is not signed$"):
        fetch(
            str(tmp_path / "origin"),
            "main",
            cache_dir=tmp_path / "c",
            verify=Verification(ssh_allowed_signers=f"ops {pub}"),
        )


def test_altered_ssh_signed_commit_is_refused(tmp_path: Path, origin: git.Repo) -> None:
    key, pub = ssh_keypair(tmp_path, "ops")
    signed_commit(origin, {"a.yaml": "signed\n"}, "signed", ssh_sign(key))
    altered = tamper(origin)
    with pytest.raises(SourceError) as err:
        fetch(
            str(tmp_path / "origin"),
            "main",
            cache_dir=tmp_path / "c",
            verify=Verification(ssh_allowed_signers=f"ops {pub}"),
        )
    assert f"commit {altered} of" in str(err.value)
    assert "bad SSH signature (the commit differs from what was signed)" in str(err.value)


def test_ssh_signed_commit_without_ssh_signers_is_refused(tmp_path: Path, origin: git.Repo) -> None:
    key, _ = ssh_keypair(tmp_path, "ops")
    signed_commit(origin, {"a.yaml": "signed\n"}, "signed", ssh_sign(key))
    with pytest.raises(SourceError, match="signed with SSH but no allowed SSH signers"):
        fetch(
            str(tmp_path / "origin"),
            "main",
            cache_dir=tmp_path / "c",
            verify=Verification(gpg_keys=("-----BEGIN PGP PUBLIC KEY BLOCK-----",)),
        )


# --- GPG ------------------------------------------------------------------------------------


@dataclass
class GpgKeys:
    home: Path
    allowed_fpr: str
    other_fpr: str
    allowed_armor: str
    other_armor: str

    def sign(self, fpr: str) -> tuple[list[str], dict[str, str]]:
        return [f"user.signingkey={fpr}", "gpg.format=openpgp"], {"GNUPGHOME": str(self.home)}


@pytest.fixture(scope="module")
def gpg_keys() -> Iterator[GpgKeys]:
    need("gpg")
    home = Path(tempfile.mkdtemp(prefix="ug-"))  # short: gpg-agent's socket path is limited
    env = {"GNUPGHOME": str(home)}
    fprs = []
    try:
        for uid in ("Allowed Signer <allowed@example.com>", "Other Signer <other@example.com>"):
            run("gpg", "--batch", "--quiet", "--passphrase", "", "--quick-gen-key", uid,
                "ed25519", "sign", "never", env=env)  # fmt: skip
            out = run("gpg", "--with-colons", "--list-keys", uid, env=env)
            fprs.append(next(ln.split(":")[9] for ln in out.splitlines() if ln.startswith("fpr")))
        armors = [run("gpg", "--armor", "--export", f, env=env) for f in fprs]
        yield GpgKeys(home, fprs[0], fprs[1], armors[0], armors[1])
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env={**os.environ, **env}, check=False)
        shutil.rmtree(home, ignore_errors=True)


def test_gpg_signed_head_is_accepted(tmp_path: Path, origin: git.Repo, gpg_keys: GpgKeys) -> None:
    cfg, env = gpg_keys.sign(gpg_keys.allowed_fpr)
    sha = signed_commit(origin, {"a.yaml": "gpg\n"}, "gpg signed", cfg, env)
    co = fetch(
        (tmp_path / "origin").as_uri(),
        "main",
        cache_dir=tmp_path / "c",
        verify=Verification(gpg_keys=(gpg_keys.allowed_armor,)),
    )
    assert co.revision == sha
    assert co.signature == f"GPG key {gpg_keys.allowed_fpr} (Allowed Signer <allowed@example.com>)"


def test_gpg_key_not_allowed_is_refused_even_when_in_the_users_keyring(
    tmp_path: Path, origin: git.Repo, gpg_keys: GpgKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, env = gpg_keys.sign(gpg_keys.other_fpr)
    sha = signed_commit(origin, {"a.yaml": "other\n"}, "other signer", cfg, env)
    # the reconciler's own GNUPGHOME trusts both keys: it must not count
    monkeypatch.setenv("GNUPGHOME", str(gpg_keys.home))
    with pytest.raises(SourceError) as err:
        fetch(
            (tmp_path / "origin").as_uri(),
            "main",
            cache_dir=tmp_path / "c",
            verify=Verification(gpg_keys=(gpg_keys.allowed_armor,)),
        )
    assert f"commit {sha} of" in str(err.value)
    assert (
        f"signed with GPG key {gpg_keys.other_fpr[-16:]}, which is not among the allowed GPG keys"
        in str(err.value)
    )


def test_altered_gpg_signed_commit_is_refused(
    tmp_path: Path, origin: git.Repo, gpg_keys: GpgKeys
) -> None:
    cfg, env = gpg_keys.sign(gpg_keys.allowed_fpr)
    signed_commit(origin, {"a.yaml": "gpg\n"}, "gpg signed", cfg, env)
    altered = tamper(origin)
    with pytest.raises(SourceError) as err:
        fetch(
            (tmp_path / "origin").as_uri(),
            "main",
            cache_dir=tmp_path / "c",
            verify=Verification(gpg_keys=(gpg_keys.allowed_armor,)),
        )
    assert f"commit {altered} of" in str(err.value)
    assert "bad GPG signature" in str(err.value)


def test_gpg_signed_commit_with_only_ssh_signers_is_refused(
    tmp_path: Path, origin: git.Repo, gpg_keys: GpgKeys
) -> None:
    _, pub = ssh_keypair(tmp_path, "ops")
    cfg, env = gpg_keys.sign(gpg_keys.allowed_fpr)
    signed_commit(origin, {"a.yaml": "gpg\n"}, "gpg signed", cfg, env)
    with pytest.raises(SourceError, match="signed with GPG but no allowed GPG keys"):
        fetch(
            (tmp_path / "origin").as_uri(),
            "main",
            cache_dir=tmp_path / "c",
            verify=Verification(ssh_allowed_signers=f"ops {pub}"),
        )


def test_both_kinds_allowed_together(tmp_path: Path, origin: git.Repo, gpg_keys: GpgKeys) -> None:
    key, pub = ssh_keypair(tmp_path, "ops")
    both = Verification(gpg_keys=(gpg_keys.allowed_armor,), ssh_allowed_signers=f"ops {pub}")
    cfg, env = gpg_keys.sign(gpg_keys.allowed_fpr)
    signed_commit(origin, {"a.yaml": "gpg\n"}, "gpg", cfg, env)
    url = (tmp_path / "origin").as_uri()
    assert fetch(url, "main", cache_dir=tmp_path / "c", verify=both).signature is not None
    signed_commit(origin, {"a.yaml": "ssh\n"}, "ssh", ssh_sign(key))
    co = fetch(url, "main", cache_dir=tmp_path / "c", verify=both)
    assert co.signature is not None and co.signature.startswith("SSH ED25519 key SHA256:")


# --- configuration ---------------------------------------------------------------------------


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_verification_from_secret(gpg_keys: GpgKeys) -> None:
    v = verification_from_secret(
        {"allowed.asc": b64(gpg_keys.allowed_armor), "allowed_signers": b64("ops ssh-ed25519 AAA")}
    )
    assert (
        v.gpg_keys == (gpg_keys.allowed_armor,) and v.ssh_allowed_signers == "ops ssh-ed25519 AAA"
    )
    with pytest.raises(SourceError, match=r"ns/keys: key 'k.pub' is not an ASCII-armored OpenPGP"):
        verification_from_secret({"k.pub": b64("ssh-ed25519 AAA")}, name="ns/keys")
    with pytest.raises(SourceError, match="no GPG key and no 'allowed_signers'"):
        verification_from_secret({}, name="ns/keys")


def test_dearmor_checks_the_armor(gpg_keys: GpgKeys) -> None:
    both = dearmor_public_keys(gpg_keys.allowed_armor + gpg_keys.other_armor)
    assert both.startswith(dearmor_public_keys(gpg_keys.allowed_armor))
    lines = gpg_keys.allowed_armor.splitlines()
    body = next(i for i, ln in enumerate(lines) if ln == "") + 2
    flipped = lines[body][:10] + ("A" if lines[body][10] != "A" else "B") + lines[body][11:]
    damaged = "\n".join([*lines[:body], flipped, *lines[body + 1 :]])
    with pytest.raises(SourceError, match=r"key #1, block 1: checksum mismatch"):
        dearmor_public_keys(damaged, what="key #1")
    with pytest.raises(SourceError, match="no '-----BEGIN PGP PUBLIC KEY BLOCK-----' found"):
        dearmor_public_keys("ssh-ed25519 AAAA")


def test_plain_directory_cannot_be_verified(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="plain directory: it has no commit to verify"):
        fetch(str(tmp_path), "main", verify=Verification(ssh_allowed_signers="x ssh-ed25519 A"))


def test_verification_from_files(tmp_path: Path, origin: git.Repo, gpg_keys: GpgKeys) -> None:
    key, pub = ssh_keypair(tmp_path, "ops")
    (tmp_path / "allowed.asc").write_text(gpg_keys.allowed_armor)
    (tmp_path / "allowed_signers").write_text(f"ops {pub}\n")
    v = verification_from_files([tmp_path / "allowed.asc"], tmp_path / "allowed_signers")
    assert v.gpg_keys == (gpg_keys.allowed_armor,) and v.ssh_allowed_signers == f"ops {pub}\n"
    signed_commit(origin, {"a.yaml": "ssh\n"}, "ssh", ssh_sign(key))
    assert fetch(str(tmp_path / "origin"), "main", cache_dir=tmp_path / "c", verify=v).signature
    with pytest.raises(SourceError, match=r"allowed_signers: not an ASCII-armored OpenPGP"):
        verification_from_files([tmp_path / "allowed_signers"])
    with pytest.raises(SourceError, match=r"/nope: cannot read: No such file"):
        verification_from_files([], tmp_path / "nope")
    with pytest.raises(SourceError, match="needs GPG key files or an allowed_signers file"):
        verification_from_files()
