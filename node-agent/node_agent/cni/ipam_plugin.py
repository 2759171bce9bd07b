"""``underlay-ipam``: the CNI IPAM plugin, a thin layer over :class:`node_agent.ipam.Ipam`.

Called by any main plugin (Debian's bridge/macvlan/ipvlan execute the shim; underlay-ovs
calls :func:`allocate` in-process). The network config's ``ipam`` section holds our options::

    {"type": "underlay-ipam", "default_ipv4_ippool": ["pool-a"], "default_ipv6_ippool": []}

Pod identity comes from CNI_ARGS ``K8S_POD_NAMESPACE``/``K8S_POD_NAME``/``K8S_POD_UID``.
The result carries ``ips`` (with gateway), ``routes`` (a default route via each gateway plus
the pool's routes) and ``dns``; IPAM plugins do not touch interfaces (CNI spec 1.0.0,
"IP Allocation"). The VLAN written into the SpiderEndpoint is the main plugin's ``vlan``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import INVALID_ENV, CniError
from .request import CniRequest

if TYPE_CHECKING:
    from concurrent.futures import Future

    from node_agent.ipam import IpamRequest

    from .server import CniAgent


def ipam_request(req: CniRequest) -> IpamRequest:
    """The IpamRequest of a CNI call; raises CniError 4 without K8S_POD_NAMESPACE/NAME."""
    from node_agent.ipam import IpamRequest

    if not req.pod_namespace or not req.pod_name:
        raise CniError(
            INVALID_ENV,
            "underlay-ipam needs K8S_POD_NAMESPACE and K8S_POD_NAME in CNI_ARGS "
            "(it allocates per Kubernetes pod)",
        )
    ipam_conf = req.config.get("ipam")
    if not isinstance(ipam_conf, dict):
        ipam_conf = {}
    vlan = req.config.get("vlan", req.config.get("vlanID", 0))
    return IpamRequest(
        namespace=req.pod_namespace,
        pod_name=req.pod_name,
        pod_uid=req.pod_uid,
        container_id=req.container_id,
        ifname=req.ifname,
        config=ipam_conf,
        vlan=vlan if isinstance(vlan, int) and not isinstance(vlan, bool) else 0,
    )


def allocate(agent: CniAgent, req: CniRequest) -> dict[str, Any]:
    """Allocate for this pod interface; returns the IPAM result (1.0.0 shape)."""
    ipam = agent.ipam
    return ipam.to_cni_result(ipam.allocate(ipam_request(req)))


def allocate_begin(agent: CniAgent, req: CniRequest) -> tuple[dict[str, Any], Future[None]]:
    """Allocate; returns the IPAM result once the pool records are written, and the future of
    the SpiderEndpoint write (see :meth:`node_agent.ipam.Ipam.allocate_begin`)."""
    ipam = agent.ipam
    done, recorded = ipam.allocate_begin(ipam_request(req))
    return ipam.to_cni_result(done), recorded


def release(agent: CniAgent, req: CniRequest) -> None:
    """Release this pod interface's IPs and SpiderEndpoint entry (idempotent).

    Without K8S_POD_NAMESPACE/NAME there is nothing to look up: it returns quietly.
    """
    if not req.pod_namespace or not req.pod_name:
        return
    agent.ipam.release(ipam_request(req))


def verify(agent: CniAgent, req: CniRequest) -> None:
    """CHECK: the pool records and the SpiderEndpoint still hold this interface's IPs."""
    agent.ipam.check(ipam_request(req))


def cmd_add(agent: CniAgent, req: CniRequest) -> dict[str, Any]:
    """CNI ADD of the IPAM plugin."""
    return allocate(agent, req)


def cmd_del(agent: CniAgent, req: CniRequest) -> None:
    """CNI DEL of the IPAM plugin."""
    release(agent, req)


def cmd_check(agent: CniAgent, req: CniRequest) -> None:
    """CNI CHECK of the IPAM plugin."""
    verify(agent, req)
