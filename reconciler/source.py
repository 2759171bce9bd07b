"""Source: bring a Git revision of the operators' repository onto local disk (gitpython).

``fetch(url, ref)`` keeps one cache checkout per URL, fetches only the wanted ref shallowly,
optionally verifies the head commit's signature, and checks the commit out detached, so each
pass sees exactly one revision. ``ls_remote(url, ref)`` tells the remote head's commit without
fetching anything, so a controller can skip a pass when the head did not move. A plain
directory that is not a Git repository is used in place (revision = ``local``). Only this
module (with :mod:`reconciler.source_auth` and :mod:`reconciler.signatures`) talks to git.

Transports: https (Basic or Bearer auth, custom CA), ssh (private key, known_hosts, strict host
key checking), ``file://`` and local paths. Credentials: see :mod:`reconciler.source_auth`.
Sources: git-fetch(1) refspecs and shallow fetch (``--depth``), git-ls-remote(1),
git-verify-commit(1); Flux GitRepository (ref, secretRef, verify) for what users expect.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import git

from reconciler.signatures import (
    SignatureError,
    Verification,
    verification_from_files,
    verification_from_secret,
    verify_commit,
)
from reconciler.source_auth import (
    Credentials,
    SourceError,
    credentials_from_env,
    credentials_from_secret,
    git_environment,
    redact,
    split_url_credentials,
)

__all__ = [
    "Checkout",
    "Credentials",
    "SignatureError",
    "SourceError",
    "Verification",
    "credentials_from_env",
    "credentials_from_secret",
    "default_cache_dir",
    "fetch",
    "is_git_url",
    "ls_remote",
    "redact",
    "verification_from_files",
    "verification_from_secret",
]

_SHA = re.compile(r"[0-9a-f]{7,40}")  # fullmatch only
_FULL_SHA = re.compile(r"[0-9a-f]{40}")
_TARGET = "refs/underlay/target"
DEFAULT_TIMEOUT = 300.0
"""Seconds a single git command may run before it is killed (a hung server never stalls the loop)."""


@dataclass(frozen=True)
class Checkout:
    """A revision on disk.

    ``path``: work tree; ``revision``: full commit SHA (``local`` for a plain directory);
    ``ref``: the ref asked for; ``url``: the URL without credentials; ``changed``: False when
    the cache already had exactly this revision checked out (nothing moved since the last fetch
    into this cache); ``signature``: who signed the commit when verification was asked
    (e.g. ``SSH ED25519 key SHA256:... (ops@example.com)``), else None.
    """

    path: Path
    revision: str
    ref: str
    url: str
    changed: bool = True
    signature: str | None = None


def is_git_url(spec: str) -> bool:
    """True for URLs git understands (scheme://, user@host:path) and for local Git repositories."""
    if "://" in spec or re.match(r"^[\w.-]+@[\w.-]+:", spec):
        return True
    p = Path(spec)
    return (p / ".git").exists() or ((p / "HEAD").is_file() and (p / "objects").is_dir())


def default_cache_dir() -> Path:
    """``$UNDERLAY_CACHE_DIR`` or ``$XDG_CACHE_HOME/underlay`` (``~/.cache/underlay``)."""
    env = os.environ.get("UNDERLAY_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "underlay"


def _url_for_git(url: str) -> str:
    p = Path(url)
    if "://" not in url and p.exists():
        return p.resolve().as_uri()
    return url


def _prepare(url: str, credentials: Credentials | None) -> tuple[str, Credentials | None]:
    """URL for git (no userinfo; local paths as file://) and the credentials to use:
    ``credentials`` (default: the ``UNDERLAY_GIT_*`` environment), then any found in the URL."""
    clean, in_url = split_url_credentials(url)
    if credentials is None:
        credentials = credentials_from_env()
    creds = credentials.merged(in_url) if credentials is not None else in_url
    return _url_for_git(clean), creds


_HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"REMOTE HOST IDENTIFICATION HAS CHANGED|Host key for .* has changed", re.S),
        "the ssh host key does not match known_hosts (the key changed or the connection is "
        "intercepted); refusing to connect",
    ),
    (
        re.compile(r"No \S+ host key is known for|Host key verification failed"),
        "the ssh host is not in known_hosts; add its key to known_hosts",
    ),
    (
        re.compile(r"Load key .*: (invalid format|error in libcrypto|incorrect passphrase)"),
        "the ssh identity is not a valid private key without passphrase",
    ),
    (
        re.compile(r"Permission denied \(publickey"),
        "ssh authentication failed: the server refused the identity key",
    ),
    (
        re.compile(
            r"Authentication failed for|could not read (Username|Password)|"
            r"requested URL returned error: 40[13]"
        ),
        "https authentication failed: check username and password or token",
    ),
    (
        re.compile(r"server certificate verification failed|SSL certificate problem|CAfile"),
        "the server's TLS certificate is not trusted: set ca.crt to the CA that signed it",
    ),
    (re.compile(r"Timeout: the command .* did not complete"), "git timed out"),
)


def _redacted(exc: git.GitCommandError, secrets: list[str]) -> git.GitCommandError:
    """A copy of gitpython's error with command, stdout and stderr redacted, to chain as the
    cause of a SourceError (tracebacks print it; the original may hold what git echoed)."""
    cmd = exc.command if isinstance(exc.command, list) else [str(exc.command)]
    return git.GitCommandError(
        [redact(str(a), secrets) for a in cmd],
        exc.status,
        redact(str(exc.stderr or ""), secrets).replace("stderr: ", "", 1).strip("'\n"),
        redact(str(exc.stdout or ""), secrets).replace("stdout: ", "", 1).strip("'\n"),
    )


_GIT_NOISE = (
    "Could not read from remote repository",
    "Please make sure you have the correct access rights",
    "and the repository exists",
)


def _explain(exc: git.GitCommandError, secrets: list[str]) -> str:
    """One line: a hint for known failures, then git's own last lines, all redacted."""
    raw = str(exc.stderr or "") or str(exc)
    raw = raw.replace("stderr: ", "").strip().strip("'")
    lines = [
        ln.strip()
        for ln in raw.splitlines()
        if ln.strip()
        and not set(ln.strip()) <= {"@"}
        and not any(noise in ln for noise in _GIT_NOISE)
    ]
    offered = re.search(r"key sent by the remote host is\s+(\S+?)\.?\s*$", raw, re.M)
    if offered:  # ssh's host key banner: keep the fingerprint the server offered
        lines.append(f"the server offered {offered.group(1)}")
    detail = redact("; ".join(lines[-3:]), secrets)
    for pattern, hint in _HINTS:
        if pattern.search(raw):
            return f"{hint} ({detail})" if detail else hint
    return detail or f"git exited with status {exc.status}"


def ls_remote(
    url: str,
    ref: str = "main",
    *,
    credentials: Credentials | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> str | None:
    """The full commit SHA ``ref`` points to on the remote, asking the server only for its ref
    list (git-ls-remote(1)); nothing is downloaded. For a controller's "skip when the head did
    not move": compare with the last revision and skip the pass when equal.

    ``ref``: branch (``refs/heads/`` first), tag (annotated tags are peeled to their commit),
    full ``refs/...`` name, or commit SHA. A full 40-hex SHA is returned as is (a pinned commit
    never moves) and an abbreviated SHA or a plain directory gives None: the caller must fetch
    to know. ``credentials`` as for :func:`fetch`. Raises SourceError (redacted) when the remote
    is unreachable, refuses the credentials or host key, or has no such ref.
    """
    if _FULL_SHA.fullmatch(ref):
        return ref
    if _SHA.fullmatch(ref) or (not is_git_url(url) and Path(url).is_dir()):
        return None
    git_url, creds = _prepare(url, credentials)
    secrets = creds.secrets() if creds else []
    shown = redact(git_url, secrets)
    names = (
        [ref, f"{ref}^{{}}"]
        if ref.startswith("refs/")
        else [
            f"refs/heads/{ref}",
            f"refs/tags/{ref}",
            f"refs/tags/{ref}^{{}}",
        ]
    )
    failure: git.GitCommandError | None = None
    out = ""
    try:
        with git_environment(creds) as env:
            out = str(git.Git().ls_remote(git_url, *names, env=env, kill_after_timeout=timeout))
    except git.GitCommandError as exc:
        failure = exc
    if failure is not None:
        why = _explain(failure, secrets)
        raise SourceError(f"cannot list {ref!r} on {shown}: {why}") from _redacted(failure, secrets)
    found: dict[str, str] = {}
    for line in out.splitlines():
        sha, _, name = line.partition("\t")
        found[name.strip()] = sha.strip()
    order = (
        [f"{ref}^{{}}", ref]
        if ref.startswith("refs/")
        else [f"refs/heads/{ref}", f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}"]
    )
    for name in order:
        if name in found:
            return found[name]
    raise SourceError(f"ref {ref!r} not found on {shown} (no such branch or tag)")


def fetch(
    url: str,
    ref: str = "main",
    *,
    cache_dir: Path | None = None,
    depth: int = 1,
    credentials: Credentials | None = None,
    verify: Verification | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> Checkout:
    """Fetch ``ref`` (branch, tag, ``refs/...`` or commit SHA) of ``url`` and check it out.

    ``cache_dir``: where the per-URL cache repository lives (default :func:`default_cache_dir`).
    ``depth``: commits to fetch (shallow when the server allows it; 0 = full history).
    ``credentials``: https/ssh credentials; None (default) reads them from the ``UNDERLAY_GIT_*``
    environment (:func:`credentials_from_env`). Credentials in the URL fill what is not set,
    and are never stored. ``verify``: when given, the head commit must carry a GPG or SSH
    signature that git verifies with one of these keys, else SignatureError (a SourceError
    naming the commit) and the work tree keeps the previous revision. ``timeout``: seconds per
    git command.

    A plain directory (not a Git repository) is returned in place with revision ``local``.
    Raises SourceError, naming the redacted URL and the ref, when the repository is unreachable,
    refuses the credentials, the ssh host key is unknown or changed, the ref does not exist or
    the signature does not verify. No credential reaches argv, the URL or ``.git/config``.
    """
    if not is_git_url(url) and Path(url).is_dir():
        if verify is not None:
            raise SourceError(f"{url} is a plain directory: it has no commit to verify")
        return Checkout(Path(url).resolve(), "local", ref, url)
    git_url, creds = _prepare(url, credentials)
    secrets = creds.secrets() if creds else []
    shown = redact(git_url, secrets)
    cache = cache_dir or default_cache_dir()
    dest = cache / hashlib.sha256(git_url.encode()).hexdigest()[:16]
    failure: git.GitCommandError | None = None
    try:
        with git_environment(creds) as env:
            if (dest / ".git").is_dir():
                repo = git.Repo(dest)
                if repo.remotes.origin.url != git_url:
                    repo.remotes.origin.set_url(git_url)
            else:
                dest.mkdir(parents=True, exist_ok=True)
                repo = git.Repo.init(dest)
                repo.create_remote("origin", git_url)
            before = _head(repo)
            sha = _fetch_ref(repo, ref, depth, env, timeout, shown)
    except git.GitCommandError as exc:
        failure = exc
    if failure is not None:
        why = _explain(failure, secrets)
        raise SourceError(f"cannot fetch {ref!r} from {shown}: {why}") from _redacted(
            failure, secrets
        )
    signature = None
    if verify is not None:
        signature = verify_commit(repo, sha, verify, where=f"{shown} ({ref})", timeout=timeout)
    try:
        repo.git.checkout("--force", "--detach", sha)
        repo.git.clean("-ffdxq")
    except git.GitCommandError as exc:
        failure = exc
    if failure is not None:
        why = _explain(failure, secrets)
        raise SourceError(f"cannot check out {sha} of {shown} in {dest}: {why}") from _redacted(
            failure, secrets
        )
    return Checkout(dest, sha, ref, shown, changed=before != sha, signature=signature)


def _head(repo: git.Repo) -> str | None:
    try:
        return str(repo.head.commit.hexsha)
    except ValueError:  # fresh repository: HEAD is unborn
        return None


def _fetch_ref(
    repo: git.Repo, ref: str, depth: int, env: dict[str, str], timeout: float | None, shown: str
) -> str:
    depth_args = [f"--depth={depth}"] if depth > 0 else []
    candidates = [f"refs/heads/{ref}", f"refs/tags/{ref}", ref]
    if ref.startswith("refs/"):
        candidates = [ref]
    elif _FULL_SHA.fullmatch(ref):
        candidates = [ref]  # a pinned commit: one round trip, not three
    last: git.GitCommandError | None = None
    for cand in candidates:
        try:
            repo.git.fetch(
                "--quiet",
                "--no-tags",
                "--no-write-fetch-head",
                *depth_args,
                "origin",
                f"+{cand}:{_TARGET}",
                env=env,
                kill_after_timeout=timeout,
            )
            return str(repo.rev_parse(f"{_TARGET}^{{commit}}").hexsha)
        except git.GitCommandError as exc:
            last = exc
            if not _missing_ref(exc):
                raise  # unreachable, auth, host key: the other candidates would fail the same way
    if _SHA.fullmatch(ref):
        # servers that refuse to serve a bare SHA: fetch every branch and tag, then look it up
        try:
            repo.git.fetch(
                "--quiet",
                "origin",
                "+refs/heads/*:refs/remotes/origin/*",
                "+refs/tags/*:refs/tags/*",
                env=env,
                kill_after_timeout=timeout,
            )
            return str(repo.rev_parse(f"{ref}^{{commit}}").hexsha)
        except (git.BadName, ValueError):
            raise SourceError(f"commit {ref} not found in {shown}") from None
    assert last is not None
    raise last


def _missing_ref(exc: git.GitCommandError) -> bool:
    text = str(exc.stderr or "")
    return (
        bool(
            re.search(
                r"couldn't find remote ref|not our ref|no such remote ref|invalid refspec|"
                r"unadvertised object|Server does not allow request",
                text,
                re.I,
            )
        )
        or not text.strip()
    )
