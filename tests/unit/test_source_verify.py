"""Signature verification wired into the reconciler and the CLI, on real signed commits against
the real control plane (as the reconciler's ServiceAccount): the allowed keys come from ``--verify-gpg-key``/``--verify-ssh-signers`` files
or a Secret (read on every pass), the signer is recorded in GitSync status, and a revision that
does not verify is refused and reported (Stalled, lastError, an Event) with nothing applied."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

from kubernetes import client

from reconciler import kube, vocab
from reconciler.controller import GitSource, Options, Reconciler, verification_provider
from reconciler.retry import RetryPolicy
from tests.unit.test_apply import BRIDGE, NS, World, pool
from tests.unit.test_source_signatures import (
    GpgKeys,
    gpg_keys,  # noqa: F401  (module fixture)
    run,
    signed_commit,
    ssh_keypair,
    ssh_sign,
)

UNDERLAY = str(Path(sys.executable).parent / "underlay")
SECRET = "underlay-git-verify"


def put_secret(world: World, data: dict[str, str]) -> None:
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(name=SECRET, namespace=NS),
        data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    )
    try:
        world.core.replace_namespaced_secret(SECRET, NS, body)
    except client.ApiException as exc:
        if exc.status != 404:
            raise
        world.core.create_namespaced_secret(NS, body)


def verifying(world: World) -> Reconciler:
    api = kube.api_client(world.kubeconfig, retry=RetryPolicy(base=0.05, cap=0.5, timeout=5))
    source = GitSource(
        str(world.origin_dir), "main", cache_dir=world.tmp / "cache",
        verification=verification_provider(api, NS, SECRET),
    )  # fmt: skip
    return Reconciler(api, source, Options(namespace=NS, identity="test"), out=world.lines.append)


def test_secret_keys_accept_signed_revisions_and_refuse_the_rest(world: World) -> None:
    key, pub = ssh_keypair(world.tmp, "ops")
    world.commit({"bridge.yaml": BRIDGE}, "unsigned start")
    signed = signed_commit(world.repo, {"pool-a.yaml": pool("pool-a", 1)}, "pool-a", ssh_sign(key))
    rec = verifying(world)
    # no Secret yet: verification was asked for, so nothing is accepted
    rep = rec.run_once()
    assert rep.reason == "VerificationFailed" and f"{NS}/{SECRET} not found" in (rep.error or "")
    assert world.get(vocab.SPIDER_IPPOOL, "pool-a") is None
    put_secret(world, {"allowed_signers": f"ops@example.com {pub}\n"})
    rep = rec.run_once()
    assert rep.converged, rep.error
    fp = run("ssh-keygen", "-lf", f"{key}.pub").split()[1]
    st = world.status()
    assert st["signature"] == {
        "revision": signed, "signer": f"SSH ED25519 key {fp} (ops@example.com)",
    }  # fmt: skip
    assert st["lastAppliedRevision"] == signed
    # an unsigned commit on top: refused, reported, nothing of it applied
    unsigned = world.commit({"pool-b.yaml": pool("pool-b", 2)}, "unsigned")
    rep = rec.run_once()
    assert rep.reason == "VerificationFailed" and rep.revision == unsigned
    assert world.get(vocab.SPIDER_IPPOOL, "pool-b") is None
    st = world.status()
    assert st["lastAppliedRevision"] == signed and st["lastAttemptedRevision"] == unsigned
    assert st["lastError"]["reason"] == "VerificationFailed"
    assert f"commit {unsigned}" in st["lastError"]["message"]
    assert "signature not verified: the commit is not signed" in st["lastError"]["message"]
    stalled = world.condition("Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "VerificationFailed"
    assert ("Warning", "VerificationFailed", st["lastError"]["message"]) in world.events()
    # a signed commit after it is accepted again
    fixed = signed_commit(
        world.repo, {"pool-b.yaml": pool("pool-b", 2, ips="10-25")}, "signed", ssh_sign(key)
    )
    rep = rec.run_once()
    assert rep.converged and world.status()["lastAppliedRevision"] == fixed
    assert world.get(vocab.SPIDER_IPPOOL, "pool-b") is not None
    # the key is removed from the Secret: the same head is verified again and refused
    _, other_pub = ssh_keypair(world.tmp, "other")
    put_secret(world, {"allowed_signers": f"other@example.com {other_pub}\n"})
    rep = rec.run_once()
    assert rep.reason == "VerificationFailed" and "not in the allowed signers" in (rep.error or "")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([UNDERLAY, *args], capture_output=True, text=True, timeout=120)


def test_cli_verify_flags(world: World, gpg_keys: GpgKeys) -> None:  # noqa: F811
    key, pub = ssh_keypair(world.tmp, "ops")
    signers = world.tmp / "allowed_signers"
    signers.write_text(f"ops@example.com {pub}\n")
    gpg_file = world.tmp / "allowed.asc"
    gpg_file.write_text(gpg_keys.allowed_armor)
    common = ["--repo", str(world.origin_dir), "--kubeconfig", world.kubeconfig, "-n", NS,
              "--cache-dir", str(world.tmp / "cli-cache")]  # fmt: skip
    sha = signed_commit(world.repo, {"pool-a.yaml": pool("pool-a", 1)}, "ssh", ssh_sign(key))
    p = cli("apply", *common, "--verify-ssh-signers", str(signers))
    assert p.returncode == 0, p.stderr
    assert f"Applied revision {sha[:12]}:" in p.stdout
    assert world.status()["signature"]["signer"].startswith("SSH ED25519 key")
    cfg, env = gpg_keys.sign(gpg_keys.allowed_fpr)
    gsha = signed_commit(world.repo, {"pool-b.yaml": pool("pool-b", 2)}, "gpg", cfg, env)
    p = cli("plan", *common, "--verify-gpg-key", str(gpg_file),
            "--verify-ssh-signers", str(signers))  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert f"Revision {gsha[:12]} of {world.origin_dir} (main), signed by GPG key " in p.stdout
    assert gpg_keys.allowed_fpr in p.stdout and "+ create    SpiderIPPool pool-b" in p.stdout
    # GPG-signed, but only SSH signers allowed: refused (exit 1), nothing applied
    p = cli("apply", *common, "--verify-ssh-signers", str(signers))
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert f"commit {gsha}" in p.stderr and "signature not verified" in p.stderr
    assert "Nothing applied" in p.stderr
    assert world.get(vocab.SPIDER_IPPOOL, "pool-b") is None
    p = cli("plan", *common, "--verify-ssh-signers", str(signers))
    assert p.returncode == 1 and "signature not verified" in p.stderr
    # verification needs a Git repository
    p = cli("plan", str(world.origin_dir), "--verify-ssh-signers", str(signers))
    assert p.returncode == 2 and "need --repo" in p.stderr
    p = cli("plan", *common, "--verify-gpg-key", str(world.tmp / "missing.asc"))
    assert p.returncode == 2 and "missing.asc: cannot read" in p.stderr
