"""A real Kubernetes control plane for the tests: etcd, kube-apiserver, kube-controller-manager.

The binaries come from ``tests/controlplane/build.sh`` (Kubernetes' own Go modules, cached by
the hash of ``go.sum``). :class:`ControlPlane` starts them the way controller-runtime's envtest
does, plus what a cluster has that envtest leaves out:

- etcd on loopback with ``--unsafe-no-fsync`` and its own data directory;
- kube-apiserver on ``127.0.0.1`` with RBAC (and Node) authorization, a serving certificate
  whose SANs cover loopback, the rig's API address (``tests.rig.APISERVER_IP``) and the
  in-cluster names, a ServiceAccount issuer and signing key, an admin identity (a client
  certificate in ``system:masters`` for the admin kubeconfig, and a static token for clients
  that go through the fault proxy, which cannot forward a client certificate);
- kube-controller-manager with per-controller ServiceAccount credentials, for ownerReference
  garbage collection, namespace deletion, EndpointSlices, StatefulSets and the ServiceAccount
  controllers (the node lifecycle controller is off: rig nodes have no kubelet heartbeat, so it
  would taint them and evict their pods);
- ``deploy/namespace.yaml``, ``deploy/rbac.yaml`` and every CRD in ``deploy/crds`` applied.

Programs under test authenticate as their ServiceAccounts with tokens from the TokenRequest API
(:meth:`ControlPlane.serviceaccount_kubeconfig`), so exactly ``deploy/``'s RBAC applies.
Everything is torn down by PID in :meth:`ControlPlane.stop`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.controlplane.pki import Pair, Pki
from tests.rig import APISERVER_IP

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEPLOY = ROOT / "deploy"
SERVICE_CIDR = "10.96.0.0/16"
CLUSTER_CIDR = "10.244.0.0/16"
ADMIN_TOKEN_USER = "underlay-test-admin"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-proxy", "kubectl")


class ControlPlaneError(RuntimeError):
    """A control-plane binary could not be built or started; the message holds its log tail."""


def binaries_dir(build: bool = True) -> Path:
    """Where the built binaries are: ``$UNDERLAY_CONTROLPLANE_BIN``, else build.sh's cache
    directory (building them first when ``build`` and they are missing; minutes)."""
    env = os.environ.get("UNDERLAY_CONTROLPLANE_BIN")
    if env:
        return Path(env)
    script = HERE / "build.sh"
    flag = [] if build else ["--print-dir"]
    proc = subprocess.run(
        ["bash", str(script), *flag], capture_output=True, text=True, timeout=3600, check=False
    )
    if proc.returncode != 0:
        raise ControlPlaneError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def missing_binaries() -> str | None:
    """None when every control-plane binary is built, else what is missing (no build)."""
    try:
        d = binaries_dir(build=False)
    except ControlPlaneError as exc:
        return str(exc)
    absent = [b for b in BINARIES if not (d / b).exists()]
    if absent:
        return f"control plane not built ({', '.join(absent)} missing in {d}): run tests/controlplane/build.sh"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def kubeconfig_dict(
    server: str,
    ca_file: Path,
    *,
    token: str | None = None,
    client: Pair | None = None,
    namespace: str = "default",
    name: str = "underlay-test",
) -> dict[str, Any]:
    """A kubeconfig (clientcmd v1 Config) for ``server`` trusting ``ca_file``, authenticating
    with a bearer ``token`` or a ``client`` certificate."""
    user: dict[str, Any] = {}
    if token is not None:
        user["token"] = token
    if client is not None:
        user["client-certificate"] = str(client.cert)
        user["client-key"] = str(client.key)
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": name, "cluster": {"server": server, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": name, "user": user}],
        "contexts": [
            {"name": name, "context": {"cluster": name, "user": name, "namespace": namespace}}
        ],
        "current-context": name,
        "preferences": {},
    }


def write_yaml(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    path.chmod(0o600)
    return path


class _Process:
    """One control-plane binary running in its own session, its output in ``log``."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name, self.log = name, log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def fail(self, what: str) -> ControlPlaneError:
        return ControlPlaneError(f"{self.name} {what} (log {self.log}):\n{self.tail()}")

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager in ``workdir``.

    After :meth:`start`: :attr:`url` (``https://127.0.0.1:<port>``), :attr:`ca_file`,
    :attr:`admin_kubeconfig` (client certificate, ``system:masters``), :attr:`admin_token`,
    :attr:`started_in` (seconds from the first process to CRDs established). ControlPlaneError
    names the binary and shows its log when a process exits or does not become ready.
    """

    def __init__(self, workdir: Path, bin_dir: Path | None = None) -> None:
        self.workdir = workdir
        self.bin_dir = bin_dir or binaries_dir()
        self.procs: list[_Process] = []
        self.url = ""
        self.port = 0
        self.started_in = 0.0
        self.admin_token = os.urandom(16).hex()
        self._pki: Pki | None = None
        self._proxy_pair: Pair | None = None

    # ---- paths -----------------------------------------------------------------------------

    def bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    @property
    def pki(self) -> Pki:
        assert self._pki is not None, "start() first"
        return self._pki

    @property
    def ca_file(self) -> Path:
        return self.pki.ca.cert

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._pki = Pki(self.workdir / "pki")
        try:
            self._start_etcd()
            self._start_apiserver()
            self._start_controller_manager()
            self.install()
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - started

    def _spawn(self, name: str, argv: list[str]) -> _Process:
        p = _Process(name, argv, self.workdir / f"{name}.log")
        self.procs.append(p)
        return p

    def _start_etcd(self) -> None:
        client_port, peer_port = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        p = self._spawn(
            "etcd",
            [
                self.bin("etcd"), "--name", "default", "--data-dir", str(self.workdir / "etcd"),
                "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"default={peer}", "--unsafe-no-fsync",
                "--log-level", "warn",
            ],
        )  # fmt: skip
        self._wait_http(p, f"{self.etcd_url}/health", 60, lambda body: b'"health":"true"' in body)

    def _start_apiserver(self) -> None:
        pki = self.pki
        serving = pki.serving("apiserver", ["127.0.0.1", APISERVER_IP, "10.96.0.1"])
        self.admin_cert = pki.client("admin", "underlay-test-admin-cert", ("system:masters",))
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(
            f'{self.admin_token},{ADMIN_TOKEN_USER},{ADMIN_TOKEN_USER},"system:masters"\n'
        )
        tokens.chmod(0o600)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        p = self._spawn(
            "kube-apiserver",
            [
                self.bin("kube-apiserver"),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1", f"--secure-port={self.port}",
                f"--advertise-address={APISERVER_IP}",
                f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={pki.ca.cert}",
                f"--token-auth-file={tokens}",
                "--authorization-mode=Node,RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                "--profiling=false",
                "--v=1",
            ],
        )  # fmt: skip
        ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
        self._wait_http(
            p, f"{self.url}/readyz", 120, lambda body: body.strip() == b"ok", ctx,
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )  # fmt: skip
        write_yaml(
            self.admin_kubeconfig,
            kubeconfig_dict(self.url, pki.ca.cert, client=self.admin_cert, name="admin"),
        )

    def _start_controller_manager(self) -> None:
        pki = self.pki
        kcm = pki.client("controller-manager", "system:kube-controller-manager")
        kubeconfig = write_yaml(
            self.workdir / "controller-manager.kubeconfig",
            kubeconfig_dict(self.url, pki.ca.cert, client=kcm, name="kcm"),
        )
        p = self._spawn(
            "kube-controller-manager",
            [
                self.bin("kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca.cert}",
                f"--cluster-signing-cert-file={pki.ca.cert}",
                f"--cluster-signing-key-file={pki.ca.key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--cluster-cidr={CLUSTER_CIDR}",
                "--controllers=*,-nodelifecycle,-cloud-node-lifecycle",
                "--concurrent-gc-syncs=10",
                "--v=1",
            ],
        )  # fmt: skip
        # Ready when its ServiceAccount controller has made the default ServiceAccount.
        deadline = time.monotonic() + 60
        while True:
            if not p.alive():
                raise p.fail("exited")
            proc = self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False)
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise p.fail("made no default ServiceAccount within 60 s")
            time.sleep(0.2)

    def install(self) -> None:
        """Apply ``deploy/namespace.yaml``, every CRD in ``deploy/crds`` and ``deploy/rbac.yaml``
        with server-side apply, and wait until every CRD is Established."""
        files = [
            DEPLOY / "namespace.yaml",
            *sorted((DEPLOY / "crds").glob("*.yaml")),
            DEPLOY / "rbac.yaml",
        ]
        args: list[str] = []
        for f in files:
            args += ["-f", str(f)]
        # deploy/ is a kustomization with namespace underlay-system; the RBAC names it already.
        # --force-conflicts: a test that changed a CRD or a Role (another field manager) is
        # undone here, so deploy/'s version wins over that manager's fields.
        self.kubectl(
            "apply", "--server-side", "--force-conflicts", "--field-manager=underlay-test-install",
            *args,
        )  # fmt: skip
        self.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "crd", "--all", timeout=90
        )

    def _wait_http(
        self,
        p: _Process,
        url: str,
        timeout: float,
        ok: Any,
        ctx: ssl.SSLContext | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if not p.alive():
                raise p.fail("exited")
            try:
                req = urllib.request.Request(url, headers=headers or {})
                with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
                    body = resp.read()
                if ok(body):
                    return
                last = body[:200].decode(errors="replace")
            except (OSError, ValueError) as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise p.fail(f"not ready within {timeout:.0f} s ({url}: {last})")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop every process, newest first (kube-controller-manager, kube-apiserver, etcd)."""
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()

    def check_alive(self) -> None:
        """ControlPlaneError when a control-plane process has died."""
        for p in self.procs:
            if not p.alive():
                raise p.fail("died")

    # ---- clients ---------------------------------------------------------------------------

    def kubectl(
        self, *args: str, kubeconfig: Path | str | None = None, check: bool = True,
        timeout: float = 60, input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run the kubectl built with the control plane (admin unless ``kubeconfig``)."""
        proc = subprocess.run(
            [self.bin("kubectl"), f"--kubeconfig={kubeconfig or self.admin_kubeconfig}", *args],
            capture_output=True, text=True, timeout=timeout, check=False, input=input,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} -> {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc

    def api_client(self, kubeconfig: Path | str | None = None) -> Any:
        """A ``kubernetes.client.ApiClient`` from ``kubeconfig`` (default: the admin's)."""
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(
            config_file=str(kubeconfig or self.admin_kubeconfig), client_configuration=cfg
        )
        return client.ApiClient(cfg)

    def token(
        self, namespace: str, name: str, *, expiration: int = 86400, create: bool = True
    ) -> str:
        """A token for ServiceAccount ``namespace/name`` from the TokenRequest API (created
        first when ``create`` and missing), as the kubelet gets one for a pod."""
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        if create:
            try:
                core.create_namespaced_service_account(
                    namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
                )
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
        req = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration)
        )
        return str(core.create_namespaced_service_account_token(name, namespace, req).status.token)

    def serviceaccount_kubeconfig(
        self,
        path: Path,
        namespace: str,
        name: str,
        server: str | None = None,
    ) -> Path:
        """Write a kubeconfig for ServiceAccount ``namespace/name`` (token from TokenRequest)
        against ``server`` (default :attr:`url`; a fault proxy's or the rig's address)."""
        tok = self.token(namespace, name)
        return write_yaml(
            path, kubeconfig_dict(server or self.url, self.ca_file, token=tok, namespace=namespace)
        )

    def token_kubeconfig(self, path: Path, server: str | None = None) -> Path:
        """Write an admin kubeconfig that uses the static admin token (works through the fault
        proxy, which cannot forward client certificates)."""
        return write_yaml(
            path, kubeconfig_dict(server or self.url, self.ca_file, token=self.admin_token)
        )

    def version(self) -> dict[str, Any]:
        """The server's ``/version`` document."""
        out = self.kubectl("get", "--raw", "/version").stdout
        return json.loads(out)  # type: ignore[no-any-return]

    # ---- in front of the server ------------------------------------------------------------

    def proxy(self) -> Any:
        """A new :class:`tests.controlplane.proxy.FaultProxy` in front of this server, not yet
        listening (its certificate covers loopback and the rig's API address)."""
        from tests.controlplane.proxy import FaultProxy

        if self._proxy_pair is None:
            self._proxy_pair = self.pki.serving("fault-proxy", ["127.0.0.1", APISERVER_IP])
        return FaultProxy(self.url, self.ca_file, self._proxy_pair)

    def relay(self, host: str, port: int, netns: str | None = None) -> Any:
        """A :class:`tests.controlplane.netns.Relay` carrying this server to ``host:port`` (in
        network namespace ``netns``), byte for byte."""
        from tests.controlplane.netns import Relay

        return Relay(("127.0.0.1", self.port), host, port, netns)
