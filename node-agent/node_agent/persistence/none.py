"""``none`` backend: nothing is written; the bridge lives until the next reboot, when the
agent's replay (bridges.enact) builds it again from the OvsBridge object."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from node_agent.persistence import Backend, Files, NodeNetConfig

if TYPE_CHECKING:
    from node_agent.bridges import DesiredBridge


class NoneBackend(Backend):
    """Renders no files and removes none."""

    name: ClassVar[str] = "none"

    def render(self, desired: DesiredBridge, node_state: NodeNetConfig) -> Files:
        return {}

    def owned_paths(self, root: Path | str, desired: DesiredBridge) -> list[str]:
        return []
