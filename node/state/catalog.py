"""The catalog: nodes, services and checks, stored and read in Consul's JSON shapes.

Rows are Consul-shaped dicts treated as immutable (replaced on write), so reads can hand out
cheap copies. Writes that change nothing keep the old ModifyIndex and leave table indexes
alone, as Consul does, so anti-entropy re-syncs do not wake every blocking query.

Like Consul's index table, each service name has its own index ("service.<name>"), moved by
every write that changes what a read of that service returns: the service's instances, their
checks, and the nodes (and node-level checks) that host them. When the last instance goes, the
entry is dropped and "service_last_extinction" moves instead, so memory follows the live
services while a watcher of the vanished service still wakes to an empty list at a higher index.

Names are looked up as Consul's memdb indexes do (`Lowercase: true` on node and service names):
the reads take `any_case=True` (or `resolve_node`) to match any spelling, tags compare in lower
case, and the per-service index is keyed by the lower-cased name, so "Web" and "web" share one.
Rows keep the spelling they were registered with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from node.state.commands import is_uuid
from node.state.tables import MISSING, Env, JMap, OpError, clone

NodeKey = str
ServiceKey = tuple[str, str]  # (node, service id)
CheckKey = tuple[str, str]  # (node, check id)

#: Consul's index-table keys (agent/consul/state/catalog.go): one per live service name, and
#: the index of the last write that removed a service's last instance.
SERVICE_INDEX_PREFIX = "service."
SERVICE_EXTINCTION = "service_last_extinction"

_STATUS_RANK = {"passing": 0, "warning": 1, "critical": 2, "maintenance": 3}


def service_index_name(service: str) -> str:
    """The pseudo-table a blocking read of one service waits on (the store resolves it);
    case-insensitive like Consul's service-name index."""
    return SERVICE_INDEX_PREFIX + service.lower()


def has_tag(tags: list[str], tag: str) -> bool:
    """Consul's serviceTagFilter: both sides lower-cased."""
    want = tag.lower()
    return any(t.lower() == want for t in tags)


def meta_matches(meta: dict[str, Any], filters: dict[str, str]) -> bool:
    """Consul's SatisfiesMetaFilters (?node-meta=): every key present with exactly that value."""
    return all(k in meta and meta[k] == v for k, v in filters.items())


def _same(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Equal apart from the raft indexes."""
    skip = ("CreateIndex", "ModifyIndex")
    return {k: v for k, v in old.items() if k not in skip} == {
        k: v for k, v in new.items() if k not in skip
    }


def _cas_ok(existing: dict[str, Any] | None, index: int) -> bool:
    if index == 0:
        return existing is None
    return existing is not None and existing["ModifyIndex"] == index


def _add(index: dict[Any, dict[Any, None]], key: Any, member: Any) -> None:
    index.setdefault(key, {})[member] = None


def _remove(index: dict[Any, dict[Any, None]], key: Any, member: Any) -> None:
    d = index.get(key)
    if d is not None:
        d.pop(member, None)
        if not d:
            del index[key]


class Catalog:
    NODES = "nodes"
    SERVICES = "services"
    CHECKS = "checks"

    def __init__(
        self,
        env: Env,
        invalidate_node: Callable[[str], None],
        invalidate_check: Callable[[str, str], None],
    ) -> None:
        self.env = env
        self._invalidate_node = invalidate_node
        self._invalidate_check = invalidate_check
        self._node_ids: dict[str, str] = {}  # node ID -> node name
        self._svc_by_node: dict[str, dict[str, None]] = {}
        self._svc_by_name: dict[str, dict[ServiceKey, None]] = {}
        self._names_by_fold: dict[str, dict[str, None]] = {}  # lower-case name -> names
        self._nodes_by_fold: dict[str, dict[str, None]] = {}  # lower-case node -> nodes
        self._chk_by_node: dict[str, dict[str, None]] = {}
        self._chk_by_service: dict[ServiceKey, dict[str, None]] = {}
        self._chk_by_state: dict[str, dict[CheckKey, None]] = {}
        self.nodes: JMap[NodeKey, dict[str, Any]] = JMap(env.journal, self._on_node)
        self.services: JMap[ServiceKey, dict[str, Any]] = JMap(env.journal, self._on_service)
        self.checks: JMap[CheckKey, dict[str, Any]] = JMap(env.journal, self._on_check)

    # -- secondary indexes ----------------------------------------------------------------

    def _on_node(self, name: str, old: Any, new: Any) -> None:
        if old is not MISSING and old["ID"]:
            self._node_ids.pop(old["ID"], None)
        if new is not MISSING and new["ID"]:
            self._node_ids[new["ID"]] = name
        if new is MISSING:
            _remove(self._nodes_by_fold, name.lower(), name)
        else:
            _add(self._nodes_by_fold, name.lower(), name)

    def _on_service(self, key: ServiceKey, old: Any, new: Any) -> None:
        if old is not MISSING:
            _remove(self._svc_by_node, key[0], key[1])
            _remove(self._svc_by_name, old["Service"], key)
            if old["Service"] not in self._svc_by_name:
                _remove(self._names_by_fold, old["Service"].lower(), old["Service"])
        if new is not MISSING:
            _add(self._svc_by_node, key[0], key[1])
            _add(self._svc_by_name, new["Service"], key)
            _add(self._names_by_fold, new["Service"].lower(), new["Service"])

    def _on_check(self, key: CheckKey, old: Any, new: Any) -> None:
        if old is not MISSING:
            _remove(self._chk_by_node, key[0], key[1])
            _remove(self._chk_by_service, (key[0], old["ServiceID"]), key[1])
            _remove(self._chk_by_state, old["Status"], key)
        if new is not MISSING:
            _add(self._chk_by_node, key[0], key[1])
            _add(self._chk_by_service, (key[0], new["ServiceID"]), key[1])
            _add(self._chk_by_state, new["Status"], key)

    # -- writes -----------------------------------------------------------------------------

    def register(
        self, node: dict[str, Any], service: dict[str, Any] | None, checks: list[dict[str, Any]]
    ) -> None:
        """Consul's ensureRegistration: node, then service, then checks, all or nothing."""
        self.ensure_node(node)
        name = node["Node"]
        if service is not None:
            self.ensure_service(name, service)
        for chk in checks:
            self.ensure_check(name, chk)

    def ensure_node(self, req: dict[str, Any]) -> None:
        name = req["Node"]
        if not name:
            raise OpError("Must provide node")
        if not req["Address"]:
            raise OpError("Must provide address")
        node_id = req["ID"]
        if node_id:
            if not is_uuid(node_id):
                raise OpError(f"Bad node ID {node_id!r}: not a UUID")
            node_id = node_id.lower()
            owner = self._node_ids.get(node_id)
            if owner is not None and owner != name:
                raise OpError(
                    f"node ID {node_id!r} for node {name!r} aliases existing node {owner!r}"
                )
        existing = self.nodes.get(name)
        row = {
            "ID": node_id,
            "Node": name,
            "Address": req["Address"],
            "Datacenter": req["Datacenter"],
            "TaggedAddresses": dict(req["TaggedAddresses"]),
            "Meta": dict(req["NodeMeta"]),
            "CreateIndex": self.env.index,
            "ModifyIndex": self.env.index,
        }
        if existing is not None:
            if _same(existing, row):
                return
            row["CreateIndex"] = existing["CreateIndex"]
        self.nodes.put(name, row)
        self.env.bump(self.NODES)
        self._bump_services_of_node(name)  # health and catalog reads of them embed the node

    def ensure_service(self, node: str, req: dict[str, Any]) -> None:
        if node not in self.nodes:
            raise OpError(f"Missing node registration {node!r}")
        if not req["Service"]:
            raise OpError("Missing service name")
        weights = req["Weights"]
        passing, warning = weights.get("Passing", 1), weights.get("Warning", 1)
        if not (isinstance(passing, int) and isinstance(warning, int)):
            raise OpError("Invalid Weights: Passing and Warning must be integers")
        if passing < 1 or warning < 0:
            raise OpError("Invalid Weights: Passing must be >= 1 and Warning >= 0")
        sid = req["ID"] or req["Service"]
        row = dict(clone(req))
        row["ID"] = sid
        row["Weights"] = {"Passing": passing, "Warning": warning}
        row["CreateIndex"] = row["ModifyIndex"] = self.env.index
        key = (node, sid)
        existing = self.services.get(key)
        if existing is not None:
            if _same(existing, row):
                return
            row["CreateIndex"] = existing["CreateIndex"]
        self.services.put(key, row)
        self.env.bump(self.SERVICES)
        self._bump_service(row["Service"])
        if existing is not None and existing["Service"] != row["Service"]:
            self._instance_gone(existing["Service"])  # renamed: the old name lost an instance
        # Checks carry a copy of the service name and tags: keep them in step.
        for cid in sorted(self._chk_by_service.get(key, {})):
            chk = self.checks.get((node, cid))
            assert chk is not None
            if chk["ServiceName"] != row["Service"] or chk["ServiceTags"] != row["Tags"]:
                new = dict(chk, ServiceName=row["Service"], ServiceTags=list(row["Tags"]))
                new["ModifyIndex"] = self.env.index
                self.checks.put((node, cid), new)
                self.env.bump(self.CHECKS)

    def ensure_check(self, node: str, req: dict[str, Any]) -> None:
        if req["Node"] and req["Node"] != node:
            raise OpError(f"check {req['CheckID']!r} names node {req['Node']!r}, not {node!r}")
        if not req["CheckID"]:
            raise OpError("Missing check ID")
        if node not in self.nodes:
            raise OpError(f"Missing node registration {node!r}")
        row = dict(clone(req))
        row["Node"] = node
        row["Name"] = row["Name"] or row["CheckID"]
        if row["ServiceID"]:
            svc = self.services.get((node, row["ServiceID"]))
            if svc is None:
                raise OpError(f"Missing service registration {row['ServiceID']!r}")
            row["ServiceName"] = svc["Service"]
            row["ServiceTags"] = list(svc["Tags"])
        else:
            row["ServiceName"] = ""
            row["ServiceTags"] = []
        row["CreateIndex"] = row["ModifyIndex"] = self.env.index
        key = (node, row["CheckID"])
        existing = self.checks.get(key)
        if existing is not None:
            if _same(existing, row):
                return
            row["CreateIndex"] = existing["CreateIndex"]
        self.checks.put(key, row)
        self.env.bump(self.CHECKS)
        self._bump_for_check(node, row)
        if existing is not None and (existing["ServiceID"], existing["ServiceName"]) != (
            row["ServiceID"],
            row["ServiceName"],
        ):
            self._bump_for_check(node, existing)  # moved away from what it was bound to
        if row["Status"] == "critical":
            self._invalidate_check(node, row["CheckID"])

    def deregister(self, node: str, service_id: str, check_id: str) -> None:
        """Unknown nodes/services/checks are a no-op, as in Consul."""
        if node not in self.nodes:
            return
        if service_id:
            self.delete_service(node, service_id)
        if check_id:
            self.delete_check(node, check_id)
        if not service_id and not check_id:
            self.delete_node(node)

    def delete_check(self, node: str, check_id: str) -> None:
        row = self.checks.get((node, check_id))
        if row is None:
            return
        self.checks.delete((node, check_id))
        self.env.bump(self.CHECKS)
        self._bump_for_check(node, row)
        self._invalidate_check(node, check_id)

    def delete_service(self, node: str, service_id: str) -> None:
        key = (node, service_id)
        if key not in self.services:
            return
        for cid in sorted(self._chk_by_service.get(key, {})):
            self.delete_check(node, cid)
        row = self.services.get(key)
        assert row is not None
        self.services.delete(key)
        self.env.bump(self.SERVICES)
        self._instance_gone(row["Service"])

    def delete_node(self, node: str) -> None:
        """The node with its services and checks; its sessions are invalidated."""
        if node not in self.nodes:
            return
        for sid in sorted(self._svc_by_node.get(node, {})):
            self.delete_service(node, sid)
        for cid in sorted(self._chk_by_node.get(node, {})):
            self.delete_check(node, cid)
        self._invalidate_node(node)
        self.nodes.delete(node)
        self.env.bump(self.NODES)

    # -- per-service indexes -------------------------------------------------------------------

    def _bump_service(self, service: str) -> None:
        self.env.bump(service_index_name(service))

    def _bump_services_of_node(self, node: str) -> None:
        """Consul's updateAllServiceIndexesOfNode: a node or node-level check change."""
        names = set()
        for sid in self._svc_by_node.get(node, {}):
            svc = self.services.get((node, sid))
            assert svc is not None
            names.add(svc["Service"])
        for name in sorted(names):
            self._bump_service(name)

    def _bump_for_check(self, node: str, chk: dict[str, Any]) -> None:
        """A service check shows in its own service's reads; a node-level check in the reads
        of every service on its node."""
        if chk["ServiceID"]:
            self._bump_service(chk["ServiceName"])
        else:
            self._bump_services_of_node(node)

    def _instance_gone(self, service: str) -> None:
        """An instance of `service` was deleted or renamed away (Consul's deleteServiceTxn):
        bump its index, or when it was the last one drop the index and move the extinction
        index, which the read then answers with (higher than any index the service had)."""
        if service.lower() in self._names_by_fold:  # another instance, maybe spelt otherwise
            self._bump_service(service)
        else:
            self.env.drop(service_index_name(service))
            self.env.bump(SERVICE_EXTINCTION)

    def service_index(self, service: str, checks: bool = False) -> int:
        """Consul's maxIndexForService: the service's own index while it has instances; for
        one without instances the last extinction's; failing both the catalog tables' max
        (with `checks` for the health reads). Blocking reads wait on service_index_name()."""
        env = self.env
        if service.lower() not in self._names_by_fold:
            extinct = env.table_indexes.get(SERVICE_EXTINCTION)
            if extinct is not None:
                return extinct
        own = env.table_indexes.get(service_index_name(service))
        if own is not None:
            return own
        tables = (self.NODES, self.SERVICES, self.CHECKS) if checks else (self.NODES, self.SERVICES)
        return max(env.table_index(t) for t in tables)

    # -- compare-and-set variants (txn verbs "cas" and "delete-cas") ---------------------------

    def cas_node(self, req: dict[str, Any], index: int) -> bool:
        """Set the node only if its ModifyIndex is `index` (0: only if it does not exist)."""
        if not _cas_ok(self.nodes.get(req["Node"]), index):
            return False
        self.ensure_node(req)
        return True

    def cas_service(self, node: str, req: dict[str, Any], index: int) -> bool:
        if not _cas_ok(self.services.get((node, req["ID"] or req["Service"])), index):
            return False
        self.ensure_service(node, req)
        return True

    def cas_check(self, node: str, req: dict[str, Any], index: int) -> bool:
        if not _cas_ok(self.checks.get((node, req["CheckID"])), index):
            return False
        self.ensure_check(node, req)
        return True

    def delete_node_cas(self, node: str, index: int) -> bool:
        """Missing counts as stale (Consul's deleteNodeCASTxn), unlike KV."""
        row = self.nodes.get(node)
        if row is None or row["ModifyIndex"] != index:
            return False
        self.delete_node(node)
        return True

    def delete_service_cas(self, node: str, service_id: str, index: int) -> bool:
        row = self.services.get((node, service_id))
        if row is None or row["ModifyIndex"] != index:
            return False
        self.delete_service(node, service_id)
        return True

    def delete_check_cas(self, node: str, check_id: str, index: int) -> bool:
        row = self.checks.get((node, check_id))
        if row is None or row["ModifyIndex"] != index:
            return False
        self.delete_check(node, check_id)
        return True

    # -- reads ------------------------------------------------------------------------------

    def node_exists(self, node: str) -> bool:
        return node in self.nodes

    def check_status(self, node: str, check_id: str) -> str | None:
        chk = self.checks.get((node, check_id))
        return None if chk is None else str(chk["Status"])

    def resolve_node(self, name: str) -> str | None:
        """The catalog's spelling of a node named in any case (Consul's node index is
        case-insensitive): the exact name if there is one, else the first in sort order."""
        if name in self.nodes:
            return name
        names = self._nodes_by_fold.get(name.lower())
        return min(names) if names else None

    def service_names(self, service: str) -> list[str]:
        """Every spelling of `service` that has instances (Consul's index folds case)."""
        return sorted(self._names_by_fold.get(service.lower(), {}))

    def node_meta(self, name: str) -> dict[str, Any] | None:
        """A node's Meta, read-only (no copy: for filtering, never hand it out)."""
        row = self.nodes.get(name)
        return None if row is None else row["Meta"]

    def node(self, name: str) -> dict[str, Any] | None:
        """Node JSON: ID, Node, Address, Datacenter, TaggedAddresses, Meta, Create/ModifyIndex."""
        row = self.nodes.get(name)
        return None if row is None else dict(clone(row))

    def list_nodes(self) -> list[dict[str, Any]]:
        """catalog/nodes: sorted by name."""
        return [clone(self.nodes.get(n)) for n in sorted(self.nodes)]

    def service(self, node: str, service_id: str) -> dict[str, Any] | None:
        """One service instance in NodeService shape."""
        row = self.services.get((node, service_id))
        return None if row is None else dict(clone(row))

    def check(self, node: str, check_id: str) -> dict[str, Any] | None:
        row = self.checks.get((node, check_id))
        return None if row is None else dict(clone(row))

    def node_services(self, name: str) -> dict[str, Any] | None:
        """catalog/node/:n -> {"Node": {...}, "Services": {id: {...}}} or None."""
        node = self.node(name)
        if node is None:
            return None
        services = {
            sid: clone(self.services.get((name, sid)))
            for sid in sorted(self._svc_by_node.get(name, {}))
        }
        return {"Node": node, "Services": services}

    def list_services(
        self, where: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, list[str]]:
        """catalog/services: {name: sorted unique tags}. With `where`, only the instances whose
        flattened CatalogService passes count (Consul's ?node-meta= and ?filter=), and a name
        none of whose instances pass is left out."""
        out: dict[str, list[str]] = {}
        for name in sorted(self._svc_by_name):
            tags: set[str] = set()
            kept = where is None
            for key in sorted(self._svc_by_name[name]):
                svc = self.services.get(key)
                assert svc is not None
                if where is not None:
                    node = self.nodes.get(key[0])
                    assert node is not None
                    if not where(self._service_node(node, svc)):
                        continue
                    kept = True
                tags.update(svc["Tags"])
            if kept:
                out[name] = sorted(tags)
        return out

    def _service_keys(self, service: str, any_case: bool) -> list[ServiceKey]:
        if not any_case:
            return sorted(self._svc_by_name.get(service, {}))
        keys: list[ServiceKey] = []
        for name in self._names_by_fold.get(service.lower(), {}):
            keys.extend(self._svc_by_name[name])
        return sorted(keys)

    def _instances(
        self, service: str, tag: str | None, any_case: bool = False
    ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        out = []
        for key in self._service_keys(service, any_case):
            svc = self.services.get(key)
            node = self.nodes.get(key[0])
            assert svc is not None and node is not None
            if tag is not None and not has_tag(svc["Tags"], tag):
                continue
            out.append((node, svc))
        return out

    @staticmethod
    def _service_node(node: dict[str, Any], svc: dict[str, Any]) -> dict[str, Any]:
        """One instance flattened with its node: Consul's CatalogService (ServiceNode)."""
        return {
            "ID": node["ID"],
            "Node": node["Node"],
            "Address": node["Address"],
            "Datacenter": node["Datacenter"],
            "TaggedAddresses": clone(node["TaggedAddresses"]),
            "NodeMeta": clone(node["Meta"]),
            "ServiceKind": svc["Kind"],
            "ServiceID": svc["ID"],
            "ServiceName": svc["Service"],
            "ServiceTags": list(svc["Tags"]),
            "ServiceAddress": svc["Address"],
            "ServiceTaggedAddresses": clone(svc["TaggedAddresses"]),
            "ServiceWeights": clone(svc["Weights"]),
            "ServiceMeta": clone(svc["Meta"]),
            "ServicePort": svc["Port"],
            "ServiceSocketPath": svc["SocketPath"],
            "ServiceEnableTagOverride": svc["EnableTagOverride"],
            "ServiceProxy": clone(svc["Proxy"]),
            "ServiceConnect": clone(svc["Connect"]),
            "ServiceLocality": clone(svc["Locality"]),
            "CreateIndex": svc["CreateIndex"],
            "ModifyIndex": svc["ModifyIndex"],
        }

    def service_nodes(
        self, service: str, tag: str | None = None, *, any_case: bool = False
    ) -> list[dict[str, Any]]:
        """catalog/service/:s: flattened CatalogService objects; `any_case` matches the name
        in any case, as Consul (the tag always compares in lower case)."""
        return [self._service_node(n, s) for n, s in self._instances(service, tag, any_case)]

    def node_checks(self, node: str) -> list[dict[str, Any]]:
        """health/node/:n."""
        return [clone(self.checks.get((node, c))) for c in sorted(self._chk_by_node.get(node, {}))]

    def service_checks(self, service: str, *, any_case: bool = False) -> list[dict[str, Any]]:
        """health/checks/:s: the checks of every instance of the service."""
        out = []
        for node, sid in self._service_keys(service, any_case):
            for cid in sorted(self._chk_by_service.get((node, sid), {})):
                out.append(clone(self.checks.get((node, cid))))
        return out

    def checks_in_state(self, state: str) -> list[dict[str, Any]]:
        """health/state/:st, with "any" for all checks."""
        keys = sorted(self.checks) if state == "any" else sorted(self._chk_by_state.get(state, {}))
        return [clone(self.checks.get(k)) for k in keys]

    def health_service(
        self,
        service: str,
        tag: str | None = None,
        passing_only: bool = False,
        *,
        any_case: bool = False,
    ) -> list[dict[str, Any]]:
        """health/service/:s: [{"Node", "Service", "Checks"}] with node and service checks."""
        out = []
        for node, svc in self._instances(service, tag, any_case):
            name = node["Node"]
            checks = [self.checks.get((name, c)) for c in sorted(self._chk_by_node.get(name, {}))]
            relevant = [c for c in checks if c is not None and c["ServiceID"] in ("", svc["ID"])]
            if passing_only and any(c["Status"] != "passing" for c in relevant):
                continue
            out.append(
                {"Node": clone(node), "Service": clone(svc), "Checks": [clone(c) for c in relevant]}
            )
        return out

    @staticmethod
    def aggregate_status(checks: list[dict[str, Any]]) -> str:
        """Worst status first: maintenance > critical > warning > passing."""
        worst = "passing"
        for c in checks:
            st = c["Status"]
            cid = c["CheckID"]
            if cid == "_node_maintenance" or cid.startswith("_service_maintenance:"):
                st = "maintenance"
            if _STATUS_RANK.get(st, 2) > _STATUS_RANK[worst]:
                worst = st
        return worst

    # -- snapshot ---------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        return {
            "nodes": [self.nodes.get(n) for n in sorted(self.nodes)],
            "services": [[k[0], k[1], self.services.get(k)] for k in sorted(self.services)],
            "checks": [[k[0], k[1], self.checks.get(k)] for k in sorted(self.checks)],
        }

    def load(self, obj: dict[str, Any]) -> None:
        self._node_ids = {}
        self._svc_by_node = {}
        self._svc_by_name = {}
        self._names_by_fold = {}
        self._nodes_by_fold = {}
        self._chk_by_node = {}
        self._chk_by_service = {}
        self._chk_by_state = {}
        self.nodes.load({str(r["Node"]): r for r in obj["nodes"]})
        self.services.load({(str(n), str(s)): r for n, s, r in obj["services"]})
        self.checks.load({(str(n), str(c)): r for n, c, r in obj["checks"]})
