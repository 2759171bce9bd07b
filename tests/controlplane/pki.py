"""The control plane's certificates and keys, made with the ``openssl`` command.

One CA signs everything: the kube-apiserver serving certificate (SANs for loopback, the rig's
API address and the in-cluster names), client certificates for the admin and for
kube-controller-manager, and the fault proxy's serving certificate. A separate RSA key signs
ServiceAccount tokens. Layout follows kubeadm's ``/etc/kubernetes/pki`` (Kubernetes
documentation, "PKI certificates and requirements").
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

IN_CLUSTER_NAMES = (
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "localhost",
)


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} -> {proc.returncode}: {proc.stderr.strip()}")


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key (PEM files)."""

    cert: Path
    key: Path


class Pki:
    """A throwaway PKI under ``root``: :attr:`ca`, :meth:`serving` and :meth:`client` pairs,
    and the ServiceAccount signing key pair (:attr:`sa_key`, :attr:`sa_pub`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca = Pair(root / "ca.crt", root / "ca.key")
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
            "-subj", "/CN=underlay-test-ca", "-keyout", self.ca.key.name,
            "-out", self.ca.cert.name,
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            cwd=root,
        )  # fmt: skip
        self.sa_key = root / "sa.key"
        self.sa_pub = root / "sa.pub"
        _openssl("genrsa", "-out", self.sa_key.name, "2048", cwd=root)
        _openssl("rsa", "-in", self.sa_key.name, "-pubout", "-out", self.sa_pub.name, cwd=root)

    def _issue(self, name: str, subject: str, ext: str) -> Pair:
        pair = Pair(self.root / f"{name}.crt", self.root / f"{name}.key")
        csr = self.root / f"{name}.csr"
        extfile = self.root / f"{name}.ext"
        extfile.write_text(ext)
        _openssl(
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
            "-keyout", pair.key.name, "-out", csr.name, cwd=self.root,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", csr.name, "-CA", self.ca.cert.name, "-CAkey", self.ca.key.name,
            "-CAcreateserial", "-days", "30", "-sha256", "-extfile", extfile.name,
            "-out", pair.cert.name, cwd=self.root,
        )  # fmt: skip
        return pair

    def serving(self, name: str, ips: list[str], dns: tuple[str, ...] = IN_CLUSTER_NAMES) -> Pair:
        """A server certificate valid for ``ips`` and ``dns`` names."""
        sans = ",".join([*(f"IP:{ip}" for ip in ips), *(f"DNS:{d}" for d in dns)])
        return self._issue(
            name,
            f"/CN={name}",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            f"extendedKeyUsage=serverAuth\nsubjectAltName={sans}\n",
        )

    def client(self, name: str, user: str, groups: tuple[str, ...] = ()) -> Pair:
        """A client certificate: CN is the Kubernetes user name, O the groups (Kubernetes
        documentation, "Authenticating", X509 client certificates)."""
        subject = f"/CN={user}" + "".join(f"/O={g}" for g in groups)
        return self._issue(
            name,
            subject,
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=clientAuth\n",
        )
