"""Verification of a commit's signature against allowed GPG keys and SSH signers (git's own check).

git does the cryptography: ``git verify-commit`` (through gitpython) runs ``gpg`` for OpenPGP
signatures and ``ssh-keygen -Y verify`` for SSH signatures (git-verify-commit(1),
git-config(1) ``gpg.ssh.allowedSignersFile``, ssh-keygen(1) ALLOWED SIGNERS). What counts as
allowed is only what the operator configured: OpenPGP keys go into a private, throw-away
``GNUPGHOME`` holding nothing else (a keyring file of the dearmored keys, RFC 4880 sections 6 and
11.1, which gpg reads as ``pubring.gpg``), SSH signers into a private ``allowed_signers`` file.
The keyring of the user running the reconciler never counts.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import git

from reconciler.source_auth import SourceError, config_env, redact

ALLOWED_SIGNERS_KEY = "allowed_signers"
"""Key of a verification Secret that holds SSH allowed signers; every other key holds
ASCII-armored OpenPGP public keys."""

_ARMOR = re.compile(
    r"-----BEGIN PGP PUBLIC KEY BLOCK-----\r?\n(?P<body>.*?)-----END PGP PUBLIC KEY BLOCK-----",
    re.S,
)
_HEADER_LINE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*: ")


class SignatureError(SourceError):
    """A revision is refused because its commit signature does not verify (unsigned, signed by
    a key that is not allowed, altered, or the tool cannot run). ``revision`` is the refused
    commit's full SHA (empty when unknown). The message names the commit and the reason."""

    def __init__(self, message: str, revision: str = "") -> None:
        super().__init__(message)
        self.revision = revision


@dataclass(frozen=True)
class Verification:
    """Which signatures are accepted on the head commit.

    ``gpg_keys``: ASCII-armored OpenPGP public keys (``gpg --armor --export``), each item may
    hold several blocks. ``ssh_allowed_signers``: lines of an ssh-keygen(1) allowed_signers file
    (``principal[,principal] [options] keytype base64-key``). A commit is accepted when git
    verifies its signature with one of these keys; unsigned commits are refused.
    """

    gpg_keys: tuple[str, ...] = ()
    ssh_allowed_signers: str = ""

    @property
    def empty(self) -> bool:
        """True when no key is configured (every commit would be refused)."""
        return not self.gpg_keys and not self.ssh_allowed_signers.strip()

    def merged(self, other: Verification | None) -> Verification:
        """The keys of both (either one's key is accepted)."""
        if other is None:
            return self
        ssh = "\n".join(
            t.rstrip("\n")
            for t in (self.ssh_allowed_signers, other.ssh_allowed_signers)
            if t.strip()
        )
        return Verification(self.gpg_keys + other.gpg_keys, ssh + "\n" if ssh else "")


def verification_from_secret(
    data: Mapping[str, str | bytes] | None, *, name: str = "verification Secret"
) -> Verification:
    """Build a Verification from a Secret's (or ConfigMap's binaryData) base64 ``data``.

    ``allowed_signers`` holds SSH signers; every other key one or more armored OpenPGP public
    keys (as Flux's ``verify.secretRef``). Raises SourceError naming the key when a value is not
    base64 UTF-8, not an armored public key, or when no key is given at all.
    """
    gpg: list[str] = []
    ssh = ""
    for key, raw in sorted((data or {}).items()):
        try:
            b = raw if isinstance(raw, bytes) else raw.encode("ascii")
            text = base64.b64decode(b, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeError, ValueError):
            raise SourceError(f"{name}: key {key!r} is not base64 of UTF-8 text") from None
        if key == ALLOWED_SIGNERS_KEY:
            ssh = text
            continue
        if not _ARMOR.search(text):
            raise SourceError(
                f"{name}: key {key!r} is not an ASCII-armored OpenPGP public key "
                f"(use {ALLOWED_SIGNERS_KEY!r} for SSH signers)"
            )
        gpg.append(text)
    v = Verification(tuple(gpg), ssh)
    if v.empty:
        raise SourceError(f"{name}: no GPG key and no {ALLOWED_SIGNERS_KEY!r} to verify with")
    return v


def verification_from_files(
    gpg_key_files: Sequence[Path | str] = (), allowed_signers_file: Path | str | None = None
) -> Verification:
    """A Verification from files on disk (a CLI's ``--verify-gpg-key FILE`` /
    ``--verify-ssh-signers FILE``): armored OpenPGP public keys and an allowed_signers file.
    Raises SourceError naming the file when one cannot be read or holds no armored key, or when
    no file is given."""
    gpg: list[str] = []
    for f in gpg_key_files:
        text = _read(f)
        if not _ARMOR.search(text):
            raise SourceError(
                f"{f}: not an ASCII-armored OpenPGP public key (gpg --armor --export)"
            )
        gpg.append(text)
    v = Verification(tuple(gpg), _read(allowed_signers_file) if allowed_signers_file else "")
    if v.empty:
        raise SourceError("signature verification needs GPG key files or an allowed_signers file")
    return v


def _read(path: Path | str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeError:
        raise SourceError(f"{path}: not UTF-8 text") from None


def _crc24(data: bytes) -> int:
    """CRC-24 of RFC 4880 section 6.1."""
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def dearmor_public_keys(text: str, *, what: str = "GPG key") -> bytes:
    """Binary OpenPGP packets of every ``PGP PUBLIC KEY BLOCK`` in ``text`` (RFC 4880 section 6.2
    ASCII armor: optional headers, a blank line, base64, ``=`` CRC-24). Raises SourceError
    naming ``what`` when there is no block, the base64 or checksum is wrong, or the data does not
    start with a public-key packet (tag 6, section 4.2)."""
    blocks = list(_ARMOR.finditer(text))
    if not blocks:
        raise SourceError(f"{what}: no '-----BEGIN PGP PUBLIC KEY BLOCK-----' found")
    out = b""
    for i, m in enumerate(blocks, 1):
        lines = [ln.strip() for ln in m.group("body").splitlines()]
        if "" in lines:  # headers end at the first blank line
            lines = lines[lines.index("") + 1 :]
        else:
            while lines and _HEADER_LINE.match(lines[0]):
                lines.pop(0)
        crc = None
        if lines and lines[-1].startswith("=") and len(lines[-1]) == 5:
            crc = lines.pop()[1:]
        try:
            data = base64.b64decode("".join(lines), validate=True)
        except (binascii.Error, ValueError):
            raise SourceError(f"{what}, block {i}: invalid base64") from None
        if crc is not None:
            try:
                want = int.from_bytes(base64.b64decode(crc, validate=True), "big")
            except (binascii.Error, ValueError):
                raise SourceError(f"{what}, block {i}: invalid checksum line") from None
            if _crc24(data) != want:
                raise SourceError(f"{what}, block {i}: checksum mismatch (key text damaged)")
        if not data or not data[0] & 0x80:
            raise SourceError(f"{what}, block {i}: not OpenPGP data")
        tag = (data[0] & 0x3F) if data[0] & 0x40 else ((data[0] >> 2) & 0x0F)
        if tag != 6:
            raise SourceError(f"{what}, block {i}: does not start with a public key (tag {tag})")
        out += data
    return out


def _signature_kind(commit: git.Commit) -> str | None:
    sig = commit.gpgsig
    if not sig:
        return None
    if "BEGIN SSH SIGNATURE" in sig:
        return "ssh"
    if "BEGIN PGP SIGNATURE" in sig:
        return "gpg"
    return "x509" if "BEGIN SIGNED MESSAGE" in sig else "unknown"


def _why(kind: str, err: str) -> str:
    if "cannot run" in err or "No such file or directory" in err:
        prog = "ssh-keygen" if kind == "ssh" else "gpg"
        return f"{prog} is not installed or cannot run"
    if kind == "ssh":
        if "No principal matched" in err:
            return "signed with an SSH key that is not in the allowed signers"
        if "valid-after" in err or "valid-before" in err or "expired" in err:
            return "the SSH key is outside its validity window in the allowed signers"
        if "verification failed" in err or "Could not verify" in err or "incorrect" in err:
            return "bad SSH signature (the commit differs from what was signed)"
    else:
        m = re.search(r"\[GNUPG:\] (?:NO_PUBKEY|ERRSIG) ([0-9A-F]+)", err)
        if "BADSIG" in err:
            return "bad GPG signature (the commit differs from what was signed)"
        if "REVKEYSIG" in err:
            return "signed with a revoked GPG key"
        if "EXPKEYSIG" in err:
            return "signed with an expired GPG key"
        if "EXPSIG" in err:
            return "the GPG signature has expired"
        if m:
            return f"signed with GPG key {m.group(1)}, which is not among the allowed GPG keys"
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[GNUPG:]")]
    return lines[-1].strip() if lines else "git verify-commit failed without a message"


def _describe(kind: str, err: str) -> str:
    if kind == "ssh":
        m = re.search(
            r'Good "git" signature (?:for (?P<who>.+?) )?with (?P<alg>\S+) key (?P<fp>\S+)', err
        )
        if m:
            who = f" ({m.group('who')})" if m.group("who") else ""
            return f"SSH {m.group('alg')} key {m.group('fp')}{who}"
        return "SSH signature"
    fpr = re.search(r"\[GNUPG:\] VALIDSIG ([0-9A-F]+)", err)
    uid = re.search(r"\[GNUPG:\] GOODSIG [0-9A-F]+ (.+)", err)
    desc = f"GPG key {fpr.group(1) if fpr else '?'}"
    return desc + (f" ({uid.group(1).strip()})" if uid else "")


def verify_commit(
    repo: git.Repo,
    sha: str,
    verification: Verification,
    *,
    where: str = "",
    timeout: float | None = 60.0,
) -> str:
    """Verify commit ``sha`` of ``repo`` with ``git verify-commit --raw``; return who signed it,
    e.g. ``GPG key C32C...12C2 (Test <t@example.com>)`` or ``SSH ED25519 key SHA256:... (ops)``.

    Raises SignatureError ``commit <sha> [of <where>]: signature not verified: <reason>`` when the
    commit is unsigned, signed by a key that is not allowed, badly signed, signed with a kind
    that has no allowed keys, or when gpg/ssh-keygen cannot run. gpg trust levels do not matter
    (``gpg.minTrustLevel=undefined``): the private keyring holds only allowed keys.
    """
    label = f"commit {sha}" + (f" of {where}" if where else "")

    def refuse(reason: str) -> SignatureError:
        return SignatureError(f"{label}: signature not verified: {redact(reason)}", sha)

    try:
        kind = _signature_kind(repo.commit(sha))
    except (ValueError, git.BadName) as exc:
        raise refuse(f"commit not found ({exc})") from None
    if kind is None:
        raise refuse("the commit is not signed")
    if kind in ("x509", "unknown"):
        raise refuse(f"{kind} signatures are not supported; sign with GPG or SSH")
    if kind == "gpg" and not verification.gpg_keys:
        raise refuse("signed with GPG but no allowed GPG keys are configured")
    if kind == "ssh" and not verification.ssh_allowed_signers.strip():
        raise refuse("signed with SSH but no allowed SSH signers are configured")

    tmp = Path(tempfile.mkdtemp(prefix="underlay-verify-"))
    try:
        os.chmod(tmp, 0o700)
        gnupg = tmp / "gnupg"
        gnupg.mkdir(mode=0o700)
        if verification.gpg_keys:
            keyring = b"".join(
                dearmor_public_keys(k, what=f"allowed GPG key #{i}")
                for i, k in enumerate(verification.gpg_keys, 1)
            )
            fd = os.open(gnupg / "pubring.gpg", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as kf:
                kf.write(keyring)
        signers = tmp / "allowed_signers"
        fd = os.open(signers, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(verification.ssh_allowed_signers.rstrip("\n") + "\n")
        env = config_env(
            [
                ("gpg.ssh.allowedSignersFile", str(signers)),
                ("gpg.minTrustLevel", "undefined"),
            ]
        )
        env["GNUPGHOME"] = str(gnupg)
        status, _out, err = repo.git.verify_commit(
            "--raw",
            sha,
            with_extended_output=True,
            with_exceptions=False,
            env=env,
            kill_after_timeout=timeout,
        )
    except git.GitCommandNotFound as exc:
        raise refuse(f"git cannot run ({exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if status != 0:
        raise refuse(_why(kind, err))
    return _describe(kind, err)
