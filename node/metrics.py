"""The agent's metrics: read from the live components at scrape time (no bookkeeping on the
hot paths) into a per-agent prometheus-client registry; /v1/agent/metrics serves it in
Prometheus text (`?format=prometheus`) or in Consul's JSON shape."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from node.agent import Agent

__all__ = ["AgentMetrics"]

GAUGE, COUNTER = "gauge", "counter"


class _AgentCollector(Collector):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        try:
            stats = a.runtime.stats()
        except RuntimeError:  # not started yet
            stats = {}
        for key, kind, doc in (
            ("members", GAUGE, "members known to gossip"),
            ("alive", GAUGE, "members alive"),
            ("health_score", GAUGE, "Lifeguard awareness score (0 is healthy)"),
            ("packets_received", COUNTER, "gossip packets received"),
            ("packets_sent", COUNTER, "gossip packets sent"),
            ("packets_dropped", COUNTER, "gossip packets dropped (bad, unauthenticated)"),
            ("probes_failed", COUNTER, "failed SWIM probes"),
        ):
            if key in stats:
                make = _gauge if kind == GAUGE else _counter
                yield make(f"meshnode_serf_{key}", doc, stats[key])
        consensus = a.consensus
        raft = consensus.raft if consensus is not None else None
        if consensus is not None and raft is not None and raft.node is not None:
            node = raft.node
            yield _gauge("meshnode_raft_leader", "1 on the Raft leader", int(raft.is_leader))
            yield _gauge("meshnode_raft_term", "current Raft term", node.term)
            yield _gauge("meshnode_raft_commit_index", "highest committed entry", node.commit_index)
            yield _gauge("meshnode_raft_applied_index", "highest applied entry", raft.applied)
            yield _gauge("meshnode_raft_last_index", "last entry in the log", node.last_index)
            yield _gauge("meshnode_raft_voters", "voters in the configuration",
                         len(node.configuration.voters))  # fmt: skip
            yield _gauge("meshnode_raft_last_contact_ms", "ms since the leader was heard",
                         consensus.last_contact_ms())  # fmt: skip
            t = raft.transport.stats
            yield _counter("meshnode_raft_rpc_auth_failures", "frames that failed to decrypt",
                           t.auth_failures)  # fmt: skip
            yield _counter("meshnode_raft_rpc_bad_frames", "malformed frames", t.bad_frames)
            store = consensus.store
            yield _gauge("meshnode_kv_entries", "keys in the KV store", len(store.kv.rows))
            cat = store.catalog
            yield _gauge("meshnode_catalog_nodes", "catalog nodes", len(cat.nodes))
            yield _gauge("meshnode_catalog_services", "service instances", len(cat.services))
            states = GaugeMetricFamily("meshnode_catalog_checks", "checks by status",
                                       labels=["status"])  # fmt: skip
            counts: dict[str, int] = {}
            for _, row in cat.checks.items():
                counts[row["Status"]] = counts.get(row["Status"], 0) + 1
            for status in ("passing", "warning", "critical", "maintenance"):
                states.add_metric([status], counts.get(status, 0))
            yield states
        dns = next((c for c in a.components if getattr(c, "name", "") == "dns"), None)
        responder = getattr(dns, "responder", None)
        if responder is not None:
            s = responder.stats
            for f in dataclasses.fields(s):
                yield _counter(f"meshnode_dns_{f.name}", f"DNS {f.name.replace('_', ' ')}",
                               getattr(s, f.name))  # fmt: skip


def _gauge(name: str, doc: str, value: float | int | str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _counter(name: str, doc: str, value: float | int | str) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=float(value))


class AgentMetrics:
    def __init__(self, agent: Agent) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_AgentCollector(agent))
        ProcessCollector(registry=self.registry)
        self.http_requests = Counter(
            "meshnode_http_requests", "HTTP API requests", ["method", "status"],
            registry=self.registry,
        )  # fmt: skip

    def prometheus(self) -> bytes:
        return bytes(generate_latest(self.registry))

    def consul_json(self) -> dict[str, Any]:
        """Consul's /v1/agent/metrics shape: Gauges and Counters with Name, Labels and values
        (dots in names, as Consul's go-metrics prints them)."""
        gauges: list[dict[str, Any]] = []
        counters: list[dict[str, Any]] = []
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                name = sample.name.removesuffix("_total").replace("_", ".")
                labels = dict(sample.labels)
                if family.type == COUNTER:
                    counters.append({"Name": name, "Count": int(sample.value), "Sum": sample.value,
                                     "Rate": 0, "Min": 0, "Max": 0, "Mean": 0, "Stddev": 0,
                                     "Labels": labels})  # fmt: skip
                else:
                    gauges.append({"Name": name, "Value": sample.value, "Labels": labels})
        return {
            "Timestamp": time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime()),
            "Gauges": gauges,
            "Points": [],
            "Counters": counters,
            "Samples": [],
        }
