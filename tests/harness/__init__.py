"""Test harness: network-namespace clusters (netns) and real agent/serf processes (agents).

Kept free of any dependency on files outside this repository so `make test` runs anywhere
with root, iproute2, nftables and iptables.
"""
