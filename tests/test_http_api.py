"""The agent and its Consul-shaped HTTP API, driven over real HTTP against a fake gossip runtime.

FakeRuntime implements gossip.runtime.GossipRuntime's public API in memory (joins succeed for
addresses registered in a FakeWorld, user events are delivered locally like serf does, key
operations act on a real Keyring). test_cli.py reuses it.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from packaging.version import Version

from gossip.config import GossipConfig
from gossip.keyring import Keyring, KeyringError, generate_key, parse_key
from gossip.member import (
    KeyResponse,
    Member,
    MemberEvent,
    MemberEventType,
    MemberStatus,
    UserEvent,
)
from gossip.runtime import GossipError
from node.agent import (
    EVENT_BUFFER_SIZE,
    USER_EVENT_PREFIX,
    Agent,
    AgentError,
    StoredEvent,
    event_index,
)
from node.config import AgentConfig

MEMBER_KEYS = {
    "Name", "Addr", "Port", "Tags", "Status", "ProtocolMin", "ProtocolMax", "ProtocolCur",
    "DelegateMin", "DelegateMax", "DelegateCur",
}  # fmt: skip
EVENT_KEYS = {
    "ID", "Name", "Payload", "NodeFilter", "ServiceFilter", "TagFilter", "Version", "LTime",
}  # fmt: skip


class FakeWorld:
    """What fake runtimes can reach: join address "ip:port" -> the member answering there."""

    def __init__(self) -> None:
        self.reachable: dict[str, Member] = {}
        self.runtimes: list[FakeRuntime] = []

    def add_peer(self, name: str, ip: str, port: int = 8301) -> Member:
        m = Member(
            name=name,
            addr=ipaddress.IPv4Address(ip).packed,
            port=port,
            tags={"role": "node"},
            status=MemberStatus.ALIVE,
        )
        self.reachable[f"{ip}:{port}"] = m
        return m


class FakeRuntime:
    """In-memory stand-in for gossip.runtime.GossipRuntime with the same public API."""

    def __init__(
        self,
        world: FakeWorld,
        *,
        name: str,
        bind_addr: str,
        bind_port: int,
        advertise_addr: str | None,
        advertise_port: int | None,
        tags: dict[str, str],
        config: GossipConfig,
        keyring: Keyring | None = None,
        keyring_path: str | None = None,
    ) -> None:
        self.world = world
        world.runtimes.append(self)
        self.name = name
        self.addr = advertise_addr or bind_addr
        self.port = advertise_port or bind_port or 18301
        self.tags = dict(tags)
        self.config = config
        self.keyring = keyring
        self.keyring_path = keyring_path
        self.started = False
        self.shut_down = False
        self.left = False
        self.leave_delay = 0.0
        self.join_calls: list[list[str]] = []
        self.sent_events: list[tuple[str, bytes, bool]] = []
        self.peers: dict[str, Member] = {}
        self.ltime = 0
        self.status = MemberStatus.ALIVE
        self._subs: list[asyncio.Queue[MemberEvent | UserEvent]] = []

    async def start(self) -> None:
        self.started = True

    async def join(self, addrs: list[str]) -> int:
        self.join_calls.append(list(addrs))
        errors, joined = [], 0
        for spec in addrs:
            hostport = spec.split("/", 1)[-1]
            if ":" not in hostport:
                hostport += ":8301"
            peer = self.world.reachable.get(hostport)
            if peer is None:
                errors.append(f"{spec}: connection refused")
                continue
            self.peers[peer.name] = peer
            self._publish(MemberEvent(MemberEventType.JOIN, peer))
            joined += 1
        if not joined:
            raise GossipError("; ".join(errors) or "no addresses given")
        return joined

    async def leave(self) -> None:
        await asyncio.sleep(self.leave_delay)
        self.left = True
        self.status = MemberStatus.LEFT

    async def shutdown(self) -> None:
        self.shut_down = True

    def local_member(self) -> Member:
        return Member(
            name=self.name,
            addr=ipaddress.IPv4Address(self.addr).packed,
            port=self.port,
            tags=dict(self.tags),
            status=self.status,
        )

    def members(self) -> list[Member]:
        return [self.local_member(), *self.peers.values()]

    async def set_tags(self, tags: dict[str, str]) -> None:
        self.tags = dict(tags)

    async def user_event(self, name: str, payload: bytes, coalesce: bool = True) -> None:
        if len(name) + len(payload) > 512:  # serf's UserEventSizeLimit
            raise ValueError("user event exceeds the limit of 512 bytes before encoding")
        self.sent_events.append((name, payload, coalesce))
        self.ltime += 1
        self._publish(UserEvent(self.ltime, name, payload, coalesce))  # serf delivers locally

    def subscribe(self) -> asyncio.Queue[MemberEvent | UserEvent]:
        q: asyncio.Queue[MemberEvent | UserEvent] = asyncio.Queue()
        self._subs.append(q)
        return q

    def inject(self, ev: MemberEvent | UserEvent) -> None:
        """Pretend gossip delivered an event from elsewhere in the cluster."""
        self._publish(ev)

    def _publish(self, ev: MemberEvent | UserEvent) -> None:
        for q in self._subs:
            q.put_nowait(ev)

    async def _key_op(self, op: Callable[[Keyring], None]) -> KeyResponse:
        resp = KeyResponse(num_nodes=1, num_resp=1)
        if self.keyring is None:
            resp.num_err = 1
            resp.messages[self.name] = "Keyring is empty (encryption not enabled)"
            return resp
        try:
            op(self.keyring)
        except KeyringError as e:
            resp.num_err = 1
            resp.messages[self.name] = str(e)
            return resp
        if self.keyring_path:
            self.keyring.save(self.keyring_path)
        return resp

    async def install_key(self, key: bytes) -> KeyResponse:
        return await self._key_op(lambda k: k.install(key))

    async def use_key(self, key: bytes) -> KeyResponse:
        return await self._key_op(lambda k: k.use(key))

    async def remove_key(self, key: bytes) -> KeyResponse:
        return await self._key_op(lambda k: k.remove(key))

    async def list_keys(self) -> KeyResponse:
        resp = await self._key_op(lambda k: None)
        if self.keyring is not None:
            for k in self.keyring.keys:
                resp.keys[base64.b64encode(k).decode()] = 1
            resp.primary_keys[base64.b64encode(self.keyring.primary_key).decode()] = 1
        return resp

    def stats(self) -> dict[str, int | str]:
        return {"members": len(self.members()), "health_score": 0, "encrypted": "false"}


def make_config(tmp_path: Path, **overrides: Any) -> AgentConfig:
    base: dict[str, Any] = {
        "node": "node1",
        "data_dir": str(tmp_path / "data"),
        "bind": "127.0.0.1",
        "advertise": "127.0.0.1",
        "client": "127.0.0.1",
        "serf_port": 0,
        "http_port": 0,
    }
    base.update(overrides)
    return AgentConfig(**base)


AgentMaker = Callable[..., Awaitable[Agent]]


@pytest.fixture
def world() -> FakeWorld:
    return FakeWorld()


@pytest.fixture
async def make_agent(tmp_path: Path, world: FakeWorld) -> AsyncIterator[AgentMaker]:
    """Factory: a started Agent (fake gossip, real HTTP on an ephemeral loopback port)."""
    agents: list[Agent] = []

    async def make(start: bool = True, **overrides: Any) -> Agent:
        config = make_config(tmp_path, **overrides)
        agent = Agent(config, runtime_factory=partial(FakeRuntime, world))
        agents.append(agent)
        if start:
            await agent.start()
        return agent

    yield make
    for a in agents:
        await a.stop()


@pytest.fixture
async def agent(make_agent: AgentMaker) -> Agent:
    return await make_agent()


@pytest.fixture
async def http(agent: Agent) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{agent.http.port}") as s:
        yield s


def fake(agent: Agent) -> FakeRuntime:
    rt = agent.runtime
    assert isinstance(rt, FakeRuntime)
    return rt


async def settle() -> None:
    """Let the agent's event pump drain what the fake runtime queued."""
    for _ in range(5):
        await asyncio.sleep(0)


# ----- /v1/agent/members, /v1/agent/self -----


async def test_members_shape(agent: Agent, world: FakeWorld, http: aiohttp.ClientSession) -> None:
    world.add_peer("node2", "127.0.0.9", 8301)
    await agent.runtime.join(["127.0.0.9"])
    async with http.get("/v1/agent/members") as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        body = await r.json()
    assert [m["Name"] for m in body] == ["node1", "node2"]
    for m in body:
        assert set(m) == MEMBER_KEYS
        assert m["Status"] == 1
        assert isinstance(m["Port"], int) and isinstance(m["Tags"], dict)
    me, peer = body
    assert (me["Addr"], peer["Addr"], peer["Port"]) == ("127.0.0.1", "127.0.0.9", 8301)
    assert (me["ProtocolMin"], me["ProtocolMax"], me["ProtocolCur"]) == (1, 5, 2)
    assert (me["DelegateMin"], me["DelegateMax"], me["DelegateCur"]) == (2, 5, 5)
    # The agent's own tags, as the brief (and Consul's role/dc/id/port tags) define them.
    tags = me["Tags"]
    assert tags["role"] == "node" and tags["dc"] == "dc1" and tags["vsn"] == "1"
    assert tags["id"] == agent.node_id and uuid.UUID(tags["id"])
    assert (tags["port"], tags["http_port"], tags["dns_port"]) == ("8300", "0", "8600")
    assert tags["build"]
    async with http.get("/v1/agent/members?segment=") as r:  # accepted and ignored
        assert r.status == 200 and len(await r.json()) == 2
    # ?wan lists the servers (Raft voters) as <node>.<dc>: this agent runs no Raft, so none
    async with http.get("/v1/agent/members?wan=1") as r:
        assert r.status == 200 and await r.json() == []


async def test_self_shape(agent: Agent, http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/agent/self") as r:
        assert r.status == 200
        body = await r.json()
    assert set(body) == {"Config", "DebugConfig", "Coord", "Member", "Stats", "Meta", "xDS"}
    # The Go client decodes it as map[string]map[string]any: objects or null only.
    assert all(v is None or isinstance(v, dict) for v in body.values())
    cfg = body["Config"]
    assert cfg["Datacenter"] == "dc1" and cfg["NodeName"] == "node1"
    assert cfg["NodeID"] == agent.node_id and cfg["Server"] is False
    assert Version(cfg["Version"]) >= Version("1.11.0")  # py-consul gates features on this
    assert cfg["Revision"]
    async with http.get("/v1/agent/members") as r:
        assert body["Member"] in await r.json()
    assert body["Meta"] == {}
    stats = body["Stats"]
    assert stats["serf_lan"]["members"] == "1"
    assert all(isinstance(v, str) for sect in stats.values() for v in sect.values())
    assert body["DebugConfig"]["node"] == "node1"


async def test_self_hides_the_encryption_key(make_agent: AgentMaker) -> None:
    agent = await make_agent(encrypt=generate_key())
    url = f"http://127.0.0.1:{agent.http.port}/v1/agent/self"
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        text = await r.text()
    assert agent.config.encrypt not in text
    assert json.loads(text)["DebugConfig"]["encrypt"] == "hidden"


async def test_pretty_json(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/agent/members?pretty") as r:
        assert "\n    " in await r.text()


# ----- join / leave -----


async def test_join_ok_and_failure(
    agent: Agent, world: FakeWorld, http: aiohttp.ClientSession
) -> None:
    world.add_peer("node2", "127.0.0.9", 8302)
    async with http.put("/v1/agent/join/127.0.0.9:8302") as r:
        assert r.status == 200
        assert await r.read() == b""
    assert fake(agent).join_calls[-1] == ["127.0.0.9:8302"]
    assert "node2" in {m.name for m in agent.runtime.members()}

    async with http.put("/v1/agent/join/127.0.0.77") as r:
        assert r.status == 500
        assert r.content_type == "text/plain"
        assert "127.0.0.77: connection refused" in await r.text()

    async with http.put("/v1/agent/join/127.0.0.9:8302?wan=1") as r:
        assert r.status == 500


async def test_join_keeps_name_slash_form(
    agent: Agent, world: FakeWorld, http: aiohttp.ClientSession
) -> None:
    world.add_peer("node2", "127.0.0.9", 8301)
    async with http.put("/v1/agent/join/node2/127.0.0.9:8301") as r:
        assert r.status == 200
    assert fake(agent).join_calls[-1] == ["node2/127.0.0.9:8301"]


async def test_leave_leaves_then_requests_shutdown(
    agent: Agent, http: aiohttp.ClientSession
) -> None:
    assert not agent.shutting_down
    async with http.put("/v1/agent/leave") as r:
        assert r.status == 200
        # Consul answers after the leave completed.
        assert fake(agent).left
    await settle()
    assert agent.shutting_down


# ----- errors -----


async def test_unknown_path_is_404_text(http: aiohttp.ClientSession) -> None:
    for path in ("/v1/nope", "/", "/v1/agent/members/extra"):
        async with http.get(path) as r:
            assert r.status == 404, path
            assert r.content_type == "text/plain"
            assert await r.text() == "404 page not found"


async def test_acl_endpoints_say_acls_are_disabled(http: aiohttp.ClientSession) -> None:
    """Consul without ACLs: 401 "ACL support disabled" on every /v1/acl/ call, which clients
    and scripts test for."""
    calls = [("GET", "/v1/acl/tokens"), ("PUT", "/v1/acl/bootstrap"),
             ("GET", "/v1/acl/token/self"), ("DELETE", "/v1/acl/policy/x")]  # fmt: skip
    for method, path in calls:
        async with http.request(method, path) as r:
            assert (r.status, await r.text()) == (401, "ACL support disabled"), path


async def test_wrong_method_is_405(http: aiohttp.ClientSession) -> None:
    cases = [
        ("PUT", "/v1/agent/members", "GET"),
        ("POST", "/v1/agent/self", "GET"),
        ("GET", "/v1/agent/join/1.2.3.4", "PUT"),
        ("GET", "/v1/agent/leave", "PUT"),
        ("GET", "/v1/event/fire/x", "PUT"),
        ("PUT", "/v1/event/list", "GET"),
        ("PATCH", "/v1/operator/keyring", None),
    ]
    for method, path, allow in cases:
        async with http.request(method, path) as r:
            assert r.status == 405, (method, path)
            assert r.content_type == "text/plain"
            assert await r.text() == f"method {method} not allowed"
            if allow:
                assert r.headers["Allow"] == allow


# ----- events -----


async def test_event_fire_shape_and_wire_format(agent: Agent, http: aiohttp.ClientSession) -> None:
    async with http.put("/v1/event/fire/deploy?node=node.*&service=web&tag=v1", data=b"v42") as r:
        assert r.status == 200
        ev = await r.json()
    assert set(ev) == EVENT_KEYS
    assert uuid.UUID(ev["ID"])
    assert ev["Name"] == "deploy" and base64.b64decode(ev["Payload"]) == b"v42"
    assert (ev["NodeFilter"], ev["ServiceFilter"], ev["TagFilter"]) == ("node.*", "web", "v1")
    assert ev["Version"] == 1 and ev["LTime"] == 0  # Consul's fire response has no LTime yet
    # On the wire it is Consul's serf event: "consul:event:<name>", coalescing off.
    name, payload, coalesce = fake(agent).sent_events[-1]
    assert name == USER_EVENT_PREFIX + "deploy" and coalesce is False
    decoded = StoredEvent.decode(payload, ltime=7)
    assert decoded.to_json() == {**ev, "LTime": 7}


async def test_event_fire_without_payload_has_null_payload(http: aiohttp.ClientSession) -> None:
    async with http.put("/v1/event/fire/ping") as r:
        assert (await r.json())["Payload"] is None


async def test_event_fire_validation(http: aiohttp.ClientSession) -> None:
    cases = [
        ("/v1/event/fire/", b"", "Missing name"),
        ("/v1/event/fire/x?tag=a", b"", "Cannot provide tag filter without service filter"),
        ("/v1/event/fire/x?node=(", b"", "Invalid node filter"),
        ("/v1/event/fire/x?service=[", b"", "Invalid service filter"),
        ("/v1/event/fire/big", b"x" * 600, "exceeds the limit of 512 bytes"),
    ]
    for path, body, message in cases:
        async with http.put(path, data=body) as r:
            assert r.status == 400, path
            assert r.content_type == "text/plain"
            assert message in await r.text(), path
    async with http.put("/v1/event/fire/x?dc=elsewhere") as r:
        assert r.status == 500 and await r.text() == "No path to datacenter"


async def test_event_fire_list_round_trip(agent: Agent, http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/event/list") as r:
        assert r.status == 200 and await r.json() == []
        assert r.headers["X-Consul-Index"] == "1"  # Consul's non-zero index for "none"
    fired = []
    for name, payload in (("deploy", b"a"), ("restart", b""), ("deploy", b"b")):
        async with http.put(f"/v1/event/fire/{name}", data=payload) as r:
            fired.append(await r.json())
    await settle()
    async with http.get("/v1/event/list") as r:
        listed = await r.json()
        index = int(r.headers["X-Consul-Index"])
    assert [e["ID"] for e in listed] == [e["ID"] for e in fired]
    for e, f in zip(listed, fired, strict=True):
        assert set(e) == EVENT_KEYS
        assert {**e, "LTime": 0} == f
    assert [e["LTime"] for e in listed] == [1, 2, 3]
    assert index == event_index(fired[-1]["ID"]) != 0

    async with http.get("/v1/event/list?name=deploy") as r:
        only = await r.json()
        assert [e["ID"] for e in only] == [fired[0]["ID"], fired[2]["ID"]]
        assert int(r.headers["X-Consul-Index"]) == event_index(fired[2]["ID"])
    async with http.get("/v1/event/list?name=restart") as r:
        (restart,) = await r.json()
        assert restart["Payload"] is None


async def test_event_index_matches_consul_uuid_to_uint64() -> None:
    # Consul XORs the first 16 hex digits with the last 16.
    eid = "b54fe110-7af5-cafc-d1fb-afc8ba432b1c"
    assert event_index(eid) == 0xB54FE1107AF5CAFC ^ 0xD1FBAFC8BA432B1C
    assert event_index("not-a-uuid") == 0


async def test_event_node_filter_applies_on_receipt(
    agent: Agent, http: aiohttp.ClientSession
) -> None:
    async with http.put("/v1/event/fire/mine?node=^node1$") as r:
        mine = await r.json()
    async with http.put("/v1/event/fire/theirs?node=^other$") as r:
        assert r.status == 200
    # A service filter only matches when a local service matches; there are none yet.
    async with http.put("/v1/event/fire/svc?service=web") as r:
        assert r.status == 200
    agent.local_services = lambda: {"web": ["v1", "canary"]}
    async with http.put("/v1/event/fire/svc-tag?service=^web$&tag=^canary$") as r:
        tagged = await r.json()
    async with http.put("/v1/event/fire/svc-badtag?service=^web$&tag=^blue$") as r:
        assert r.status == 200
    await settle()
    async with http.get("/v1/event/list") as r:
        assert [e["ID"] for e in await r.json()] == [mine["ID"], tagged["ID"]]


async def test_events_from_other_nodes_and_plain_serf_events(
    agent: Agent, http: aiohttp.ClientSession
) -> None:
    remote = StoredEvent(id=str(uuid.uuid4()), name="remote", payload=b"\x00\xff")
    rt = fake(agent)
    rt.inject(UserEvent(41, USER_EVENT_PREFIX + "remote", remote.encode(), False))
    rt.inject(UserEvent(42, "consul:new-leader", b"x", False))  # Consul-internal: not listed
    rt.inject(UserEvent(43, "serf-deploy", b"raw", True))  # a plain `serf event`
    rt.inject(UserEvent(44, USER_EVENT_PREFIX + "junk", b"\xc1not msgpack", False))
    rexec = StoredEvent(id=str(uuid.uuid4()), name="_rexec", payload=b"{}")
    rt.inject(UserEvent(45, USER_EVENT_PREFIX + "_rexec", rexec.encode(), False))
    await settle()
    async with http.get("/v1/event/list") as r:
        listed = await r.json()
    assert [e["Name"] for e in listed] == ["remote", "serf-deploy"]
    assert listed[0]["ID"] == remote.id and listed[0]["LTime"] == 41
    assert base64.b64decode(listed[0]["Payload"]) == b"\x00\xff"
    assert base64.b64decode(listed[1]["Payload"]) == b"raw" and uuid.UUID(listed[1]["ID"])


async def test_event_list_keeps_the_last_256(agent: Agent, http: aiohttp.ClientSession) -> None:
    ids = []
    for i in range(EVENT_BUFFER_SIZE + 20):
        ids.append((await agent.fire_event(f"e{i}", b"")).id)
    await settle()
    async with http.get("/v1/event/list") as r:
        listed = await r.json()
    assert [e["ID"] for e in listed] == ids[-EVENT_BUFFER_SIZE:]


async def test_event_list_blocks_until_a_new_event(
    agent: Agent, http: aiohttp.ClientSession
) -> None:
    await agent.fire_event("first", b"")
    await settle()
    async with http.get("/v1/event/list") as r:
        index = r.headers["X-Consul-Index"]

    # Same index and a short wait: returns unchanged after about the wait.
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with http.get(f"/v1/event/list?index={index}&wait=200ms") as r:
        assert r.headers["X-Consul-Index"] == index
        assert len(await r.json()) == 1
    assert 0.15 <= loop.time() - t0 < 2.0

    async def fire_later() -> str:
        await asyncio.sleep(0.2)
        return (await agent.fire_event("second", b"")).id

    task = asyncio.create_task(fire_later())
    t0 = loop.time()
    async with http.get(f"/v1/event/list?index={index}&wait=10s") as r:
        listed = await r.json()
        new_index = r.headers["X-Consul-Index"]
    assert 0.15 <= loop.time() - t0 < 5.0
    second_id = await task
    assert listed[-1]["ID"] == second_id and new_index == str(event_index(second_id))

    # A stale index returns at once.
    t0 = loop.time()
    async with http.get("/v1/event/list?index=12345&wait=10s") as r:
        assert r.status == 200
    assert loop.time() - t0 < 1.0


async def test_event_list_bad_blocking_params(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/event/list?index=abc") as r:
        assert r.status == 400 and await r.text() == "Invalid index"
    async with http.get("/v1/event/list?index=5&wait=soon") as r:
        assert r.status == 400 and await r.text() == "Invalid wait time"


# ----- keyring -----


async def test_keyring_requires_encryption(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/operator/keyring") as r:
        assert r.status == 500
        assert "encryption is not enabled" in await r.text()


async def test_keyring_list_install_use_remove(make_agent: AgentMaker) -> None:
    k1, k2 = generate_key(), generate_key()
    agent = await make_agent(encrypt=k1)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{agent.http.port}") as http:

        async def listing() -> dict[str, Any]:
            async with http.get("/v1/operator/keyring") as r:
                assert r.status == 200
                (pool,) = await r.json()
                return dict(pool)

        pool = await listing()
        assert pool == {
            "WAN": False, "Datacenter": "dc1", "Segment": "", "Keys": {k1: 1},
            "PrimaryKeys": {k1: 1}, "NumNodes": 1,
        }  # fmt: skip

        async with http.post("/v1/operator/keyring", json={"Key": k2}) as r:
            assert r.status == 200 and await r.read() == b""
        assert (await listing())["Keys"] == {k1: 1, k2: 1}

        async with http.put("/v1/operator/keyring", json={"key": k2}) as r:  # any case, like Go
            assert r.status == 200
        assert (await listing())["PrimaryKeys"] == {k2: 1}

        async with http.delete("/v1/operator/keyring", json={"Key": k2}) as r:
            assert r.status == 500  # the primary cannot be removed
            text = await r.text()
            assert "dc1 (LAN) error: 1/1 nodes reported failure" in text
            assert "node1: cannot remove the primary key" in text

        async with http.delete("/v1/operator/keyring", json={"Key": k1}) as r:
            assert r.status == 200
        assert (await listing())["Keys"] == {k2: 1}

        for body, message in (
            ({"Key": "not base64!"}, "Invalid key"),
            ({"Key": base64.b64encode(b"short").decode()}, "Invalid key"),
            ({}, "Missing Key"),
            ([1], "Request decode failed"),
        ):
            async with http.post("/v1/operator/keyring", json=body) as r:
                assert r.status == 400 and message in await r.text()
        async with http.post("/v1/operator/keyring", data=b"{nope") as r:
            assert r.status == 400 and "Request decode failed" in await r.text()

    # Rotations reach the persisted keyring (the runtime saves; the agent gave it the path).
    path = Path(agent.config.data_dir or "") / "serf" / "local.keyring"
    assert json.loads(path.read_text()) == [k2]


# ----- agent lifecycle -----


async def test_node_id_is_persisted(make_agent: AgentMaker, tmp_path: Path) -> None:
    a = await make_agent()
    node_id = a.node_id
    assert (tmp_path / "data" / "node-id").read_text() == node_id
    await a.stop()
    b = await make_agent()
    assert b.node_id == node_id


async def test_corrupt_node_id_fails_start(make_agent: AgentMaker, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "node-id").write_text("garbage")
    with pytest.raises(AgentError, match="does not hold a UUID"):
        await make_agent()


async def test_dev_mode_writes_nothing(make_agent: AgentMaker, tmp_path: Path) -> None:
    a = await make_agent(data_dir=None, dev=True, encrypt=generate_key())
    assert uuid.UUID(a.node_id)
    assert a.encryption_enabled
    assert fake(a).keyring_path is None
    assert not (tmp_path / "data").exists()


async def test_encrypt_seeds_keyring_and_existing_file_wins(
    make_agent: AgentMaker, tmp_path: Path
) -> None:
    k1, k2 = generate_key(), generate_key()
    a = await make_agent(encrypt=k1)
    path = tmp_path / "data" / "serf" / "local.keyring"
    assert json.loads(path.read_text()) == [k1]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert fake(a).keyring is not None and fake(a).keyring_path == str(path)
    await a.stop()

    b = await make_agent(encrypt=k2)  # the file wins over a different --encrypt (Consul)
    kr = fake(b).keyring
    assert kr is not None and kr.primary_key == parse_key(k1) and kr.keys == [parse_key(k1)]
    await b.stop()

    c = await make_agent()  # no --encrypt at all: the file still enables encryption
    assert c.encryption_enabled


async def test_no_encrypt_no_keyring(agent: Agent, tmp_path: Path) -> None:
    assert not agent.encryption_enabled and fake(agent).keyring is None
    assert not (tmp_path / "data" / "serf" / "local.keyring").exists()


async def test_start_join_failure_aborts_start(make_agent: AgentMaker) -> None:
    with pytest.raises(AgentError, match=r"failed to join 127\.0\.0\.66: .*connection refused"):
        await make_agent(join=("127.0.0.66",))


async def test_start_join_success(make_agent: AgentMaker, world: FakeWorld) -> None:
    world.add_peer("seed", "127.0.0.8")
    agent = await make_agent(join=("127.0.0.66", "127.0.0.8"))
    assert fake(agent).join_calls == [["127.0.0.66", "127.0.0.8"]]
    assert "seed" in {m.name for m in agent.runtime.members()}


async def test_retry_join_keeps_trying(make_agent: AgentMaker, world: FakeWorld) -> None:
    agent = await make_agent(retry_join=("127.0.0.8",), retry_interval=0.05)
    rt = fake(agent)
    await asyncio.sleep(0.12)
    assert len(rt.join_calls) >= 2 and "seed" not in {m.name for m in rt.members()}
    world.add_peer("seed", "127.0.0.8")
    for _ in range(100):
        if "seed" in {m.name for m in rt.members()}:
            break
        await asyncio.sleep(0.02)
    assert "seed" in {m.name for m in rt.members()}
    calls = len(rt.join_calls)
    await asyncio.sleep(0.15)
    assert len(rt.join_calls) == calls  # stops after success


async def test_mdns_discovery_joins_peers(
    tmp_path: Path, world: FakeWorld, make_agent: AgentMaker
) -> None:
    seen: dict[str, Any] = {}

    class FakeDiscovery:
        def __init__(
            self, name: str, addr: str, port: int, on_peer: Callable[[str], Awaitable[None]]
        ) -> None:
            seen.update(name=name, addr=addr, port=port)
            self.on_peer = on_peer
            seen["discovery"] = self

        async def start(self) -> None:
            seen["started"] = True

        async def stop(self) -> None:
            seen["stopped"] = True

    world.add_peer("peer", "127.0.0.8", 9000)
    agent = Agent(
        make_config(tmp_path, discover="mdns", serf_port=8999),
        runtime_factory=partial(FakeRuntime, world),
        discovery_factory=FakeDiscovery,
    )
    await agent.start()
    try:
        assert seen["started"] and (seen["name"], seen["addr"], seen["port"]) == (
            "node1", "127.0.0.1", 8999,
        )  # fmt: skip
        disc = seen["discovery"]
        await disc.on_peer("127.0.0.1:8999")  # ourselves: ignored
        await disc.on_peer("127.0.0.99:1")  # unreachable: ignored quietly
        await disc.on_peer("127.0.0.8:9000")
        assert fake(agent).join_calls == [["127.0.0.99:1"], ["127.0.0.8:9000"]]
        assert "peer" in {m.name for m in agent.runtime.members()}
    finally:
        await agent.stop()
    assert seen["stopped"]


async def test_components_start_in_order_and_stop_in_reverse(make_agent: AgentMaker) -> None:
    trail: list[str] = []

    class Layer:
        def __init__(self, name: str) -> None:
            self.name = name

        async def start(self) -> None:
            trail.append(f"start {self.name}")

        async def stop(self) -> None:
            trail.append(f"stop {self.name}")

    agent = await make_agent(start=False)
    agent.add_component(Layer("raft"))
    agent.add_component(Layer("catalog"))
    await agent.start()
    with pytest.raises(RuntimeError):
        agent.add_component(Layer("late"))
    await agent.stop()
    assert trail == ["start raft", "start catalog", "stop catalog", "stop raft"]
    assert fake(agent).shut_down


async def test_http_port_in_use_fails_start(make_agent: AgentMaker) -> None:
    first = await make_agent()
    with pytest.raises(AgentError, match="cannot start http"):
        await make_agent(http_port=first.http.port)


async def test_sigterm_leaves_gracefully_and_exits_0(tmp_path: Path, world: FakeWorld) -> None:
    agent = Agent(make_config(tmp_path), runtime_factory=partial(FakeRuntime, world))
    run = asyncio.create_task(agent.run())
    while agent.http is None or agent._phase is None or not agent._phase.done():
        await asyncio.sleep(0.01)
    os.kill(os.getpid(), signal.SIGHUP)  # reserved for reload: logged, not fatal
    await asyncio.sleep(0.05)
    assert not run.done()
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(run, 5) == 0
    assert fake(agent).left and fake(agent).shut_down


async def test_second_signal_forces_exit(tmp_path: Path, world: FakeWorld) -> None:
    agent = Agent(make_config(tmp_path), runtime_factory=partial(FakeRuntime, world))
    run = asyncio.create_task(agent.run())
    while agent.http is None or agent._phase is None or not agent._phase.done():
        await asyncio.sleep(0.01)
    fake(agent).leave_delay = 60.0  # a leave that hangs
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.sleep(0.1)
    assert not run.done()
    os.kill(os.getpid(), signal.SIGINT)
    assert await asyncio.wait_for(run, 5) == 1
    assert not fake(agent).left and fake(agent).shut_down
