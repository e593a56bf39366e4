"""Gossip timings. Defaults equal memberlist's LAN profile so mixed meshnode/serf clusters agree."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class GossipConfig:
    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    indirect_checks: int = 3
    suspicion_mult: int = 4
    suspicion_max_timeout_mult: int = 6
    retransmit_mult: int = 4
    push_pull_interval: float = 30.0
    gossip_to_the_dead_time: float = 30.0
    tcp_timeout: float = 10.0
    awareness_max_multiplier: int = 8
    udp_buffer_size: int = 1400
    # serf-level
    broadcast_timeout: float = 5.0
    leave_propagate_delay: float = 1.0
    reconnect_interval: float = 30.0
    reconnect_timeout: float = 24 * 3600.0
    tombstone_timeout: float = 24 * 3600.0
    reap_interval: float = 15.0
    # LZW as memberlist does. Streams (push/pull: the whole member list) shrink ~3x for little
    # CPU; per-datagram compression costs CPU on every packet for small gains, so it is off.
    compress: bool = False
    compress_streams: bool = True
    tcp_pings: bool = True

    @classmethod
    def lan(cls) -> GossipConfig:
        return cls()

    def with_(self, **kw: object) -> GossipConfig:
        return replace(self, **kw)  # type: ignore[arg-type]


def suspicion_timeout(mult: int, n: int, interval: float) -> float:
    """memberlist's suspicionTimeout: mult * max(1, log10(n)) * interval, in whole milliseconds."""
    node_scale = max(1.0, math.log10(max(1.0, float(n))))
    return math.floor(mult * math.floor(node_scale * 1000) * interval) / 1000.0


def retransmit_limit(mult: int, n: int) -> int:
    return mult * math.ceil(math.log10(n + 1))


def push_pull_scale(interval: float, n: int) -> float:
    """Above 32 nodes the push/pull interval grows with log2(n), as in memberlist."""
    if n <= 32:
        return interval
    return interval * (math.ceil(math.log2(n) - 5) + 1)
