"""Source: bring a Git revision of the operators' repository onto local disk (gitpython).

``fetch(url, ref)`` keeps one cache checkout per URL, fetches only the wanted ref shallowly,
and checks out the commit detached, so each pass sees exactly one revision. A plain directory
that is not a Git URL is used in place (revision = ``local``). Only this module talks to git.
Source: git-fetch(1) refspecs, shallow clones (``--depth``).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import git

_SHA = re.compile(r"^[0-9a-f]{7,40}$")
_SECRET_IN_URL = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<cred>[^/@\s]+)@", re.I)


class SourceError(RuntimeError):
    """The repository or ref could not be fetched; the message names URL (redacted) and ref."""


@dataclass(frozen=True)
class Checkout:
    """A revision on disk: ``path`` (work tree), ``revision`` (commit SHA or ``local``), ``ref``."""

    path: Path
    revision: str
    ref: str
    url: str


def redact(text: str) -> str:
    """Replace credentials in URLs (``https://user:token@host``) with ``***``."""
    return _SECRET_IN_URL.sub(lambda m: f"{m.group('scheme')}***@", text)


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


def fetch(
    url: str, ref: str = "main", *, cache_dir: Path | None = None, depth: int = 1
) -> Checkout:
    """Fetch ``ref`` (branch, tag or commit SHA) of ``url`` and check it out; return the Checkout.

    Shallow (``depth`` commits) when the server allows it. Raises SourceError with the
    redacted URL when the repository is unreachable or the ref does not exist.
    """
    git_url = _url_for_git(url)
    cache = cache_dir or default_cache_dir()
    dest = cache / hashlib.sha256(git_url.encode()).hexdigest()[:16]
    try:
        if (dest / ".git").is_dir():
            repo = git.Repo(dest)
            if repo.remotes.origin.url != git_url:
                repo.remotes.origin.set_url(git_url)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            repo = git.Repo.init(dest)
            repo.create_remote("origin", git_url)
        sha = _fetch_ref(repo, ref, depth)
        repo.git.checkout("--force", "--detach", sha)
        repo.git.clean("-ffdxq")
    except git.GitCommandError as exc:
        detail = redact((exc.stderr or str(exc)).strip().replace("stderr: ", ""))
        raise SourceError(f"cannot fetch {ref!r} from {redact(url)}: {detail}") from None
    return Checkout(dest, sha, ref, redact(url))


def _fetch_ref(repo: git.Repo, ref: str, depth: int) -> str:
    origin = repo.remotes.origin
    target = "refs/underlay/target"
    depth_args = [f"--depth={depth}"] if depth > 0 else []
    candidates = [f"refs/heads/{ref}", f"refs/tags/{ref}", ref]
    if ref.startswith("refs/"):
        candidates = [ref]
    last: git.GitCommandError | None = None
    for cand in candidates:
        try:
            repo.git.fetch("--quiet", "--no-tags", *depth_args, "origin", f"+{cand}:{target}")
            return str(repo.rev_parse(f"{target}^{{commit}}").hexsha)
        except git.GitCommandError as exc:
            last = exc
    if _SHA.match(ref):
        # servers that refuse to serve a bare SHA: fetch every branch and tag, then look it up
        try:
            origin.fetch(["+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*"])
            return str(repo.rev_parse(f"{ref}^{{commit}}").hexsha)
        except (git.GitCommandError, git.BadName, ValueError) as exc:
            raise SourceError(f"commit {ref} not found in {redact(origin.url)}") from exc
    assert last is not None
    raise last
