"""Credentials for the Git source, how they reach git, and how they are kept out of every text.

Credentials come from the Kubernetes Secret ``underlay-git-credentials`` (keys ``username``,
``password`` or ``token``, ``ca.crt``, ``identity``, ``known_hosts``; Flux's GitRepository
secret layout) or from ``UNDERLAY_GIT_*`` environment variables. They reach git only through
the environment of the git process: ``GIT_CONFIG_COUNT``/``GIT_CONFIG_KEY_<n>``/
``GIT_CONFIG_VALUE_<n>`` (git-config(1), ENVIRONMENT; git >= 2.31) for ``http.extraHeader`` and
``http.sslCAInfo``, and ``GIT_SSH_COMMAND`` for ssh. Never in the URL, in argv (visible to every
user in ``ps``) or in the cache repository's ``.git/config``. Files that must exist (CA bundle,
ssh private key, known_hosts) live in a private ``0700`` temporary directory as ``0600`` files
and are removed when the git command returns.

Every text that leaves the source (exception, log line, event, status) goes through
:func:`redact`, which hides userinfo in URLs, ``Authorization:`` header values, token query
parameters and every credential value this process has been given.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shlex
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

SECRET_NAME = "underlay-git-credentials"
"""Name of the Secret the reconciler reads in its own namespace."""

SECRET_KEYS = ("username", "password", "token", "ca.crt", "identity", "known_hosts")
"""Keys of :data:`SECRET_NAME` that :func:`credentials_from_secret` understands."""

ENV_PREFIX = "UNDERLAY_GIT_"
"""Prefix of the environment variables :func:`credentials_from_env` reads:
``USERNAME``, ``PASSWORD``, ``TOKEN`` (values) and ``CA_FILE``, ``IDENTITY_FILE``,
``KNOWN_HOSTS_FILE`` (paths of files to read)."""

MASK = "***"
_MIN_SECRET_LEN = (
    4  # shorter values would mask ordinary words; they are still hidden in URLs/headers
)


class SourceError(RuntimeError):
    """The Git source failed: unreachable, bad credentials, unknown host key, missing ref,
    unverified signature, malformed Secret. The message names the URL (redacted), ref, commit
    or Secret key concerned and never contains a credential."""


# --- redaction -------------------------------------------------------------------------------

_known: set[str] = set()
_known_lock = threading.Lock()

_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<cred>[^/@\s]+)@", re.I)
_AUTH_HEADER = re.compile(
    r"(?P<head>\b(?:proxy-)?authorization\s*[:=]\s*(?:(?:basic|bearer|token|digest)\s+)?)"
    r"(?P<value>[^\s'\",;]+)",
    re.I,
)
_BEARER = re.compile(r"(?P<head>\bbearer\s+)(?P<value>[A-Za-z0-9._~+/=-]{6,})", re.I)
_TOKEN_PARAM = re.compile(
    r"(?P<head>[?&](?:access_token|private_token|token|password|passwd|pwd|secret)=)"
    r"(?P<value>[^&\s#'\"]+)",
    re.I,
)


def _mask_userinfo(m: re.Match[str]) -> str:
    # a bare ssh user name (ssh://git@host) is not a secret; anything else in userinfo may be
    scheme, cred = m.group("scheme"), m.group("cred")
    if scheme.lower() in ("ssh://", "git+ssh://", "ssh+git://") and ":" not in cred:
        return m.group(0)
    return f"{scheme}{MASK}@"


def register_secret(*values: str | None) -> None:
    """Remember credential ``values`` so :func:`redact` hides them in any text from now on.

    Values shorter than 4 characters are not remembered (they would mask ordinary words);
    they are still hidden where they appear as URL userinfo or header values.
    """
    with _known_lock:
        for v in values:
            if v and len(v) >= _MIN_SECRET_LEN:
                _known.add(v)
                q = quote(v, safe="")
                if q != v:
                    _known.add(q)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Return ``text`` with credentials replaced by ``***``.

    Hides: userinfo in URLs (``https://user:token@host`` -> ``https://***@host``; a bare ssh
    user such as ``ssh://git@host`` stays), the value of
    ``Authorization:``/``Proxy-Authorization:`` headers and ``Bearer`` tokens, token-like query
    parameters (``access_token=``, ``private_token=``, ``token=``, ``password=``), every value
    given in ``secrets`` and every value passed to :func:`register_secret` (which
    :class:`Credentials` does for its own values). Longest values are replaced first.
    """
    with _known_lock:
        values = set(_known)
    for s in secrets:
        if s:
            values.add(s)
            values.add(quote(s, safe=""))
    for v in sorted(values, key=len, reverse=True):
        if v in text:
            text = text.replace(v, MASK)
    text = _URL_USERINFO.sub(_mask_userinfo, text)
    text = _AUTH_HEADER.sub(lambda m: m.group("head") + MASK, text)
    text = _BEARER.sub(lambda m: m.group("head") + MASK, text)
    return _TOKEN_PARAM.sub(lambda m: m.group("head") + MASK, text)


# --- credentials -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """What git needs to reach a private repository; every field optional.

    - ``username`` + ``password``: HTTP Basic (RFC 7617). ``username`` + ``token``: Basic with
      the token as password (GitHub, GitLab, Gitea access tokens). ``token`` alone: HTTP
      ``Authorization: Bearer <token>`` (RFC 6750).
    - ``ca_cert``: PEM bundle trusted for the https server instead of the system store.
    - ``identity``: ssh private key (OpenSSH or PEM, no passphrase); ``known_hosts``: lines in
      sshd(8) SSH_KNOWN_HOSTS FILE FORMAT, the only host keys accepted.

    Constructing one registers its secret values with :func:`register_secret`. ``repr`` never
    shows the values. Raises SourceError for a password without a username or for both a
    password and a token.
    """

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    ca_cert: str | None = field(default=None, repr=False)
    identity: str | None = field(default=None, repr=False)
    known_hosts: str | None = field(default=None, repr=False)
    origin: str = "credentials"
    """Where they came from (``Secret ns/name``, ``environment``), for error messages."""

    def __post_init__(self) -> None:
        register_secret(self.password, self.token, self.identity)
        for line in (self.identity or "").splitlines():  # a key line quoted alone is hidden too
            if len(line.strip()) >= 16 and not line.startswith("-----"):
                register_secret(line.strip())
        if self.password and self.token:
            raise SourceError(f"{self.origin}: set either 'password' or 'token', not both")
        if self.password and not self.username:
            raise SourceError(f"{self.origin}: 'password' needs 'username'")
        register_secret(*self.secrets())

    def secrets(self) -> list[str]:
        """The values that must never be shown: password, token, ssh private key and the
        ``Authorization`` header value built from them."""
        out = [s for s in (self.password, self.token, self.identity) if s]
        header = self.authorization()
        if header:
            out.append(header.split(" ", 1)[1])
        return out

    def authorization(self) -> str | None:
        """The HTTP ``Authorization`` header value (``Basic <b64>`` or ``Bearer <token>``), or
        None when no http credentials are set."""
        secret = self.password or self.token
        if self.username is not None and secret:
            raw = f"{self.username}:{secret}".encode()
            return "Basic " + base64.b64encode(raw).decode("ascii")
        if self.token:
            return f"Bearer {self.token}"
        return None

    @property
    def empty(self) -> bool:
        """True when no field is set."""
        return not any(
            (
                self.username,
                self.password,
                self.token,
                self.ca_cert,
                self.identity,
                self.known_hosts,
            )
        )

    def merged(self, fallback: Credentials | None) -> Credentials:
        """These credentials with unset fields taken from ``fallback`` (e.g. a Secret over the
        environment). Http credentials are taken as one group so a Secret's token is never
        combined with the environment's username."""
        if fallback is None:
            return self
        has_http = bool(self.password or self.token)
        return Credentials(
            username=self.username if has_http else fallback.username,
            password=self.password if has_http else fallback.password,
            token=self.token if has_http else fallback.token,
            ca_cert=self.ca_cert or fallback.ca_cert,
            identity=self.identity or fallback.identity,
            known_hosts=self.known_hosts or fallback.known_hosts,
            origin=self.origin,
        )


def credentials_from_secret(
    data: Mapping[str, str | bytes] | None, *, name: str = SECRET_NAME
) -> Credentials:
    """Turn a Secret's ``data`` (values base64-encoded, as the Kubernetes API returns them) into
    Credentials. ``name`` (e.g. ``underlay-system/underlay-git-credentials``) only labels errors.

    Keys: ``username``, ``password`` or ``token``, ``ca.crt``, ``identity``, ``known_hosts``
    (Kubernetes API, Secret ``data``: base64 of the bytes). Other keys are ignored. Surrounding
    whitespace of username/password/token is stripped (``echo`` adds a newline). Raises
    SourceError naming the key (never its value) when a value is not base64 or not UTF-8.
    """
    where = f"Secret {name}"
    values: dict[str, str] = {}
    for key in SECRET_KEYS:
        raw = (data or {}).get(key)
        if raw is None:
            continue
        try:
            b = raw if isinstance(raw, bytes) else raw.encode("ascii")
            decoded = base64.b64decode(b, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeError, ValueError):
            raise SourceError(f"{where}: key {key!r} is not base64 of UTF-8 text") from None
        values[key] = decoded
    for key in ("username", "password", "token"):
        if key in values:
            values[key] = values[key].strip()
    return Credentials(
        username=values.get("username") or None,
        password=values.get("password") or None,
        token=values.get("token") or None,
        ca_cert=values.get("ca.crt") or None,
        identity=values.get("identity") or None,
        known_hosts=values.get("known_hosts") or None,
        origin=where,
    )


def credentials_from_env(environ: Mapping[str, str] | None = None) -> Credentials | None:
    """Credentials from ``UNDERLAY_GIT_USERNAME``/``_PASSWORD``/``_TOKEN`` and the files named by
    ``UNDERLAY_GIT_CA_FILE``/``_IDENTITY_FILE``/``_KNOWN_HOSTS_FILE``; None when none is set.
    Raises SourceError naming the variable when a file cannot be read."""
    env = os.environ if environ is None else environ

    def value(name: str) -> str | None:
        v = env.get(ENV_PREFIX + name, "").strip()
        return v or None

    def content(name: str) -> str | None:
        p = value(name)
        if p is None:
            return None
        try:
            return Path(p).read_text()
        except OSError as exc:
            raise SourceError(f"{ENV_PREFIX}{name}={p}: cannot read: {exc.strerror}") from None
        except UnicodeError:
            raise SourceError(f"{ENV_PREFIX}{name}={p}: not UTF-8 text") from None

    creds = Credentials(
        username=value("USERNAME"),
        password=value("PASSWORD"),
        token=value("TOKEN"),
        ca_cert=content("CA_FILE"),
        identity=content("IDENTITY_FILE"),
        known_hosts=content("KNOWN_HOSTS_FILE"),
        origin="environment " + ENV_PREFIX + "*",
    )
    return None if creds.empty else creds


def split_url_credentials(url: str) -> tuple[str, Credentials | None]:
    """Move userinfo out of a URL: ``https://user:tok@host/r`` -> (``https://host/r``,
    Credentials(username='user', password='tok')). An ssh user name without a password stays in
    the URL (it is not a secret); scp-like ``user@host:path`` is returned unchanged."""
    if "://" not in url:
        return url, None
    parts = urlsplit(url)
    if parts.password is None and (parts.username is None or parts.scheme in ("ssh", "git+ssh")):
        return url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if parts.scheme in ("ssh", "git+ssh"):
        register_secret(password)
        clean = urlunsplit(parts._replace(netloc=f"{parts.username}@{netloc}"))
        return clean, None
    clean = urlunsplit(parts._replace(netloc=netloc))
    if password is None:  # https://token@host: the user part is the token
        return clean, Credentials(token=user, origin="URL")
    return clean, Credentials(username=user, password=password or None, origin="URL")


# --- passing credentials to git ----------------------------------------------------------------


def _write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    return path


def config_env(
    pairs: Iterable[tuple[str, str]], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment that adds git config ``pairs`` through ``GIT_CONFIG_COUNT``/``_KEY_n``/
    ``_VALUE_n`` (git-config(1), ENVIRONMENT), after any entries already in ``base``
    (default ``os.environ``)."""
    env = os.environ if base is None else base
    try:
        n = int(env.get("GIT_CONFIG_COUNT", "0"))
    except ValueError:
        n = 0
    out: dict[str, str] = {}
    for key, val in pairs:
        out[f"GIT_CONFIG_KEY_{n}"] = key
        out[f"GIT_CONFIG_VALUE_{n}"] = val
        n += 1
    out["GIT_CONFIG_COUNT"] = str(n)
    return out


def ssh_command(identity: Path | None, known_hosts: Path | None) -> str:
    """The ``GIT_SSH_COMMAND`` value: OpenSSH client with no user/system config (``-F
    /dev/null``), no prompts, ``StrictHostKeyChecking=yes`` (an unknown or changed host key is
    refused), only ``identity`` offered and only ``known_hosts`` trusted when given
    (ssh_config(5))."""
    argv = [
        "ssh",
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "UpdateHostKeys=no",
        "-o",
        "ConnectTimeout=30",
    ]
    if identity is not None:
        argv += ["-i", str(identity), "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none"]
    if known_hosts is not None:
        argv += [
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
        ]
    return shlex.join(argv)


@contextmanager
def git_environment(creds: Credentials | None) -> Iterator[dict[str, str]]:
    """Yield the environment entries (to pass as gitpython's ``env=``) that give git ``creds``.

    Always: ``GIT_TERMINAL_PROMPT=0`` (never wait for a password), ``GIT_SSH_COMMAND`` with
    strict host key checking. With http credentials: ``http.extraHeader: Authorization: ...``
    and an emptied ``credential.helper`` list (nothing stores them). With ``ca_cert``:
    ``http.sslCAInfo`` and ``GIT_SSL_CAINFO`` (which overrides the config when the image sets
    it) pointing at a 0600 file. With ``identity``/``known_hosts``: 0600 files
    named in ``GIT_SSH_COMMAND``. Files live in a 0700 directory from :func:`tempfile.mkdtemp`
    (``$TMPDIR``) that is removed on exit, also on error.
    """
    tmp: Path | None = None
    try:
        pairs: list[tuple[str, str]] = []
        identity = known_hosts = None
        if creds is not None:
            if creds.ca_cert or creds.identity or creds.known_hosts:
                tmp = Path(tempfile.mkdtemp(prefix="underlay-git-"))
                os.chmod(tmp, 0o700)
            header = creds.authorization()
            if header:
                pairs += [
                    ("credential.helper", ""),
                    ("http.extraHeader", f"Authorization: {header}"),
                ]
            if creds.ca_cert and tmp is not None:
                ca = _write_private(tmp / "ca.crt", creds.ca_cert)
                pairs.append(("http.sslCAInfo", str(ca)))
            if creds.identity and tmp is not None:
                key = creds.identity.replace("\r\n", "\n")
                identity = _write_private(tmp / "identity", key)
            if creds.known_hosts and tmp is not None:
                known_hosts = _write_private(tmp / "known_hosts", creds.known_hosts)
        env = config_env(pairs)
        for key, val in pairs:
            if key == "http.sslCAInfo":
                env["GIT_SSL_CAINFO"] = val  # the variable, when set, wins over the config
        env["GIT_TERMINAL_PROMPT"] = "0"
        env["GIT_SSH_COMMAND"] = ssh_command(identity, known_hosts)
        env["GIT_SSH_VARIANT"] = "ssh"
        yield env
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
