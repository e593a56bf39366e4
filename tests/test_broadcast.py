"""The broadcast queue's ordering rules."""

from __future__ import annotations

from gossip.broadcast import BroadcastQueue


def test_named_first_goes_in_every_packet_until_its_limit() -> None:
    q = BroadcastQueue()
    q.queue(b"S" * 100, "self")
    for i in range(20):
        q.queue(bytes([i]) * 100, f"other{i}")
    packets = [q.get(2, 400, transmit_limit=3, first="self") for _ in range(5)]
    # 3 messages of 102 bytes fit in 400; ours leads the first three packets, then is done
    assert [p[0][:1] for p in packets[:3]] == [b"S"] * 3
    assert all(b"S" * 100 not in p for p in packets[3:])
    assert all(len(p) == 3 for p in packets)


def test_without_first_fewest_transmits_then_newest() -> None:
    q = BroadcastQueue()
    for i in range(4):
        q.queue(bytes([i]) * 10)
    assert q.get(2, 30, transmit_limit=5) == [bytes([3]) * 10, bytes([2]) * 10]
    assert q.get(2, 30, transmit_limit=5) == [bytes([1]) * 10, bytes([0]) * 10]
    assert q.get(2, 30, transmit_limit=5) == [bytes([3]) * 10, bytes([2]) * 10]
