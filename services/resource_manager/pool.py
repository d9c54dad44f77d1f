"""The MCP pool: health state of every MCP (OPTIONS probes) and least-loaded selection.

Sans-I/O: the daemon sends the probes and feeds their outcome here with ``now``; the pool returns the
state transitions for the daemon to log and act on.

Health states of one MCP (transitions in :data:`TRANSITIONS`, events named after their cause)::

    unknown --ok--> up          a probe got 200 (its X-CV-Load, when present, is the MCP's load)
    any     --ok--> up
    any     --drain--> draining a probe got 503: the MCP is shutting down or out of service; it
                                keeps its sessions but takes no new ones (issue 5, graceful drain)
    any     --lost--> down      ``failures_before_down`` probes in a row went unanswered (or failed);
                                its sessions are reported lost

Only ``up`` MCPs receive new sessions. An INVITE that an MCP does not answer counts as a missed probe
(passive health check), so a dead MCP is avoided even between probes.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

from services.config import McpConfig

log = logging.getLogger("callvault.rm.pool")


class Health(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DRAINING = "draining"
    DOWN = "down"


#: (state, event) -> new state. ``miss`` only counts; the pool turns enough misses into ``lost``.
TRANSITIONS: dict[tuple[Health, str], Health] = {}
for _state in Health:
    TRANSITIONS[(_state, "ok")] = Health.UP
    TRANSITIONS[(_state, "drain")] = Health.DRAINING
    TRANSITIONS[(_state, "lost")] = Health.DOWN


@dataclass
class Transition:
    """An MCP changed health state."""

    mcp: str
    old: Health
    new: Health
    reason: str


@dataclass
class McpNode:
    """What the RM knows about one MCP (plain data)."""

    name: str
    host: str
    port: int
    state: Health = Health.UNKNOWN
    misses: int = 0
    reported_load: int | None = None  # X-CV-Load of the last probe answer
    placed_since_report: int = 0  # sessions placed after that answer
    last_placed: float = 0.0
    last_ok: float = 0.0
    changed: float = 0.0
    last_error: str = ""

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"sip:record@{host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "host": self.host,
            "port": self.port,
            "state": self.state.value,
            "misses": self.misses,
            "reported_load": self.reported_load,
            "last_ok": self.last_ok,
            "last_error": self.last_error,
        }


class McpPool:
    """Health and selection over the configured MCPs."""

    def __init__(self, mcps: list[McpConfig], *, failures_before_down: int = 3) -> None:
        if failures_before_down < 1:
            raise ValueError("failures_before_down must be at least 1")
        self.failures_before_down = failures_before_down
        self.nodes: dict[str, McpNode] = {m.name: McpNode(m.name, m.host, m.port) for m in mcps}

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.nodes.values())

    def node(self, name: str) -> McpNode:
        return self.nodes[name]

    def by_address(self, host: str, port: int) -> McpNode | None:
        return next((n for n in self.nodes.values() if n.host == host and n.port == port), None)

    # -- health -----------------------------------------------------------------------------------
    def _fire(self, node: McpNode, event: str, now: float, reason: str) -> Transition | None:
        new = TRANSITIONS[(node.state, event)]
        if new is node.state:
            return None
        old, node.state, node.changed = node.state, new, now
        log.info("MCP %s: %s -> %s (%s)", node.name, old.value, new.value, reason)
        return Transition(node.name, old, new, reason)

    def probe_ok(self, name: str, now: float, load: int | None = None) -> Transition | None:
        """A probe (or any request) got a 2xx from the MCP."""
        node = self.nodes[name]
        node.misses = 0
        node.last_ok = now
        node.last_error = ""
        if load is not None:
            node.reported_load = load
            node.placed_since_report = 0
        return self._fire(node, "ok", now, "answered OPTIONS")

    def probe_draining(self, name: str, now: float, reason: str = "503") -> Transition | None:
        """The MCP answered but refuses new sessions (503 to OPTIONS)."""
        node = self.nodes[name]
        node.misses = 0
        node.last_ok = now
        node.last_error = reason
        return self._fire(node, "drain", now, f"refuses new sessions ({reason})")

    def probe_failed(self, name: str, now: float, reason: str) -> Transition | None:
        """A probe (or an INVITE) went unanswered or failed."""
        node = self.nodes[name]
        node.misses += 1
        node.last_error = reason
        if node.misses >= self.failures_before_down:
            return self._fire(node, "lost", now, f"{node.misses} failed probes, last: {reason}")
        log.debug("MCP %s: probe failed (%d/%d): %s", name, node.misses, self.failures_before_down, reason)
        return None

    def mark_down(self, name: str, now: float, reason: str) -> Transition | None:
        """Another RM found the MCP dead (active/active): down here too, until a probe answers."""
        node = self.nodes[name]
        node.misses = max(node.misses, self.failures_before_down)
        node.last_error = reason
        return self._fire(node, "lost", now, reason)

    def healthy(self, name: str) -> bool:
        node = self.nodes.get(name)
        return node is not None and node.state is Health.UP

    # -- selection --------------------------------------------------------------------------------
    def load(self, name: str, active: dict[str, int] | None = None) -> int:
        """The MCP's load as the RM sees it: its last reported load plus the sessions placed on it
        since, or (when it never reported one) the live dialogs the RM placed on it."""
        node = self.nodes[name]
        if node.reported_load is not None:
            return node.reported_load + node.placed_since_report
        return (active or {}).get(name, 0)

    def placed(self, name: str, now: float) -> None:
        """A new session was sent to ``name``."""
        node = self.nodes[name]
        node.placed_since_report += 1
        node.last_placed = now

    def choose(
        self,
        *,
        active: dict[str, int] | None = None,
        exclude: set[str] | frozenset[str] = frozenset(),
        prefer: str | None = None,
    ) -> McpNode | None:
        """The MCP for a new session: ``prefer`` (the session's affinity) when it is healthy, else
        the healthy MCP with the lowest load (ties: the one that got a session longest ago, then
        configuration order). None when no healthy MCP is left."""
        if prefer is not None and prefer not in exclude and self.healthy(prefer):
            return self.nodes[prefer]
        candidates = [n for n in self.nodes.values() if n.state is Health.UP and n.name not in exclude]
        if not candidates:
            return None
        order = {name: i for i, name in enumerate(self.nodes)}
        return min(candidates, key=lambda n: (self.load(n.name, active), n.last_placed, order[n.name]))
