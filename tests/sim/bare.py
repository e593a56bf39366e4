"""memberlist alone (SWIM + Lifeguard, no Serf layer), for simulations too big for Serf's state.

At 10,000 nodes every view holds 10,000 members: 10^8 entries in one process. Serf keeps its own
record per member (tags, status, Lamport times) next to memberlist's and would double that;
failure detection and dissemination are memberlist's alone, so the large simulations drop Serf.
A node still advertises the same tags bytes a Serf node would, so packets keep their real size.

`preload_converged` gives every node the converged view a long-running cluster has, without
simulating n joins: formation at 10,000 nodes would need every node to learn every join through
gossip and push/pull, 10^8 deliveries, which is what the 1,000-node runs measure instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from gossip.member import Member, MemberEvent, MemberEventType, MemberStatus
from gossip.messages import NodeState
from gossip.serf import encode_tags
from gossip.swim import Address, Effect, Memberlist, NodeInfo

SIM_META = encode_tags({"role": "node", "dc": "sim"})


class BareDelegate:
    """What memberlist needs from the layer above: fixed meta, and FAILED events recorded."""

    def __init__(self) -> None:
        self.events: list[MemberEvent] = []

    def node_meta(self, limit: int) -> bytes:
        return SIM_META

    def notify_msg(self, msg: bytes, now: float) -> None:
        pass

    def get_broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        return []

    def has_broadcasts(self) -> bool:
        return False

    def local_state(self, join: bool) -> bytes:
        return b""

    def merge_remote_state(self, buf: bytes, join: bool, now: float) -> None:
        pass

    def notify_join(self, node: NodeInfo, now: float) -> None:
        pass

    def notify_leave(self, node: NodeInfo, now: float) -> None:
        if node.state == NodeState.DEAD:
            member = Member(node.name, node.addr, node.port, {}, MemberStatus.FAILED, node.vsn)
            self.events.append(MemberEvent(MemberEventType.FAILED, member))

    def notify_update(self, node: NodeInfo, now: float) -> None:
        pass


class BareNode:
    """The slice of Serf's driving interface that SimNetwork uses, over a bare Memberlist."""

    def __init__(self, memberlist: Memberlist, delegate: BareDelegate) -> None:
        self.memberlist = memberlist
        self._delegate = delegate

    def start(self, now: float) -> None:
        self.memberlist.start(now)

    def joined(self, now: float) -> None:
        pass

    def tick(self, now: float) -> None:
        self.memberlist.tick(now)

    def next_deadline(self) -> float | None:
        return self.memberlist.next_deadline()

    def receive_packet(self, data: bytes, src: Address, now: float) -> None:
        self.memberlist.receive_packet(data, src, now)

    def take_effects(self) -> list[Effect]:
        return self.memberlist.take_effects()

    def take_events(self) -> list[MemberEvent]:
        out, self._delegate.events = self._delegate.events, []
        return out

    def status(self, name: str) -> MemberStatus | None:
        info = self.memberlist.nodes.get(name)
        if info is None:
            return None
        return {
            NodeState.ALIVE: MemberStatus.ALIVE,
            NodeState.SUSPECT: MemberStatus.ALIVE,  # Serf reports suspects alive too
            NodeState.DEAD: MemberStatus.FAILED,
            NodeState.LEFT: MemberStatus.LEFT,
        }[info.state]


def preload_converged(members: Sequence[Memberlist], now: float) -> None:
    """Give every not-yet-started member the view of a converged cluster: all alive at
    incarnation 1, each in its own random probe order. Call before `start`, which then adds
    the node itself and staggers its first push/pull over the interval scaled for n.

    The name, address, meta and version bytes are shared between the views (a real node would
    hold its own copies; here it is the difference between ~13 and ~20 GB at 10,000 nodes).
    """
    template = [(m.name, m.addr, m.port, SIM_META, m.vsn) for m in members]
    for m in members:
        if m.nodes:
            raise ValueError(f"{m.name} already has a view")
        nodes = m.nodes
        for name, addr, port, meta, vsn in template:
            if name != m.name:
                nodes[name] = NodeInfo(name, addr, port, meta, vsn, 1, NodeState.ALIVE, now)
        order = list(nodes)
        m.rng.shuffle(order)
        m._probe_order = order  # memberlist's one nodes slice: probe order and random picks
