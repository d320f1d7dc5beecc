"""The WireGuard subsystem (kernel backend) against a fake device that speaks pyroute2's API.

The fake answers ``info()`` with real pyroute2 ``wgmsg`` objects (encoded, then decoded, as the
kernel's dump would be), and applies ``set()`` with the kernel's semantics (clamped private key,
update_only, replace_allowed_ips, remove). Every write is recorded. Each apply goes through the
subsystem contract: observe (given the heartbeat's link dump) → plan → apply.
"""

import base64
import errno
import itertools
import random
import socket

import pytest
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import wgmsg

from agent.errors import ApplyError, ApplyResult
from agent.links.model import (
    AddAddress,
    CreateWireGuard,
    DelAddress,
    DeleteLink,
    Link,
    LinkPlan,
    Observed,
    SetMtu,
    SetUp,
)
from agent.wireguard import keys as wgkeys
from agent.wireguard.applier import WireGuardApplier
from schemas.desired import Snapshot, WgPeer, WireGuard

pytestmark = pytest.mark.timeout(20)


class FakeLinks:
    """The applier's ``Links`` seam (the links subsystem), in memory."""

    def __init__(self):
        self.links: dict[str, Link] = {}
        self.writes: list[str] = []
        self.reads = 0
        self.lookups = 0  # actions on a link given without its ifindex (RTM_GETLINK)
        self.next_index = 10

    def seen(self) -> Observed:
        """What the heartbeat's link dump would hold."""
        return Observed(links=dict(self.links))

    async def observe_link(self, name):
        self.reads += 1
        return self.links.get(name)

    async def apply(self, plan):
        writes = 0
        for a in plan.actions:
            name = a.name
            if not isinstance(a, CreateWireGuard) and plan.indexes.get(name) is None:
                self.lookups += 1
            self.writes.append(f"{type(a).__name__} {name}")
            link = self.links.get(name)
            match a:
                case CreateWireGuard():
                    self.next_index += 1
                    link = Link(
                        name=name, kind="wireguard", mtu=1420, up=False, index=self.next_index
                    )
                case DeleteLink():
                    link = None
                case SetMtu(mtu=mtu):
                    link = Link(**{**_fields(link), "mtu": mtu})
                case SetUp():
                    link = Link(**{**_fields(link), "up": True})
                case AddAddress(address=x):
                    link = Link(**{**_fields(link), "addresses": link.addresses | {x}})
                case DelAddress(address=x):
                    link = Link(**{**_fields(link), "addresses": link.addresses - {x}})
            if link is None:
                self.links.pop(name, None)
            else:
                self.links[name] = link
            writes += 1
        return ApplyResult(writes=writes, reached=frozenset(self.links))


def _fields(link: Link) -> dict:
    return {f: getattr(link, f) for f in link.__struct_fields__}


class FakeWireGuard:
    """State of one kernel WireGuard device, behind pyroute2's ``WireGuard`` methods."""

    def __init__(self, links: FakeLinks, split: bool = False):
        self.links, self.split = links, split
        self.private_key: str | None = None
        self.listen_port = 0
        self.peers: dict[
            str, dict
        ] = {}  # public key -> endpoint (addr, port) | None, ips, handshake
        self.sets: list[dict] = []
        self.fail_for: set[str] = set()
        self.fail_code = errno.EINVAL

    def close(self):
        pass

    def _check(self, ifname):
        link = self.links.links.get(ifname)
        if link is None or link.kind != "wireguard":
            raise NetlinkError(errno.ENODEV)

    def set(self, interface, listen_port=None, fwmark=None, private_key=None, peer=None):
        self._check(interface)
        self.sets.append({"listen_port": listen_port, "private_key": private_key, "peer": peer})
        if private_key is not None:
            self.private_key = wgkeys.clamp(private_key)
        if listen_port is not None:
            self.listen_port = listen_port
        if peer is None:
            return
        pub = peer["public_key"]
        if pub in self.fail_for:
            raise NetlinkError(self.fail_code)
        if peer.get("remove"):
            self.peers.pop(pub, None)
            return
        if peer.get("update_only") and pub not in self.peers:
            return
        state = self.peers.setdefault(pub, {"endpoint": None, "ips": set(), "handshake": 0})
        if "endpoint_addr" in peer:
            state["endpoint"] = (peer["endpoint_addr"], peer["endpoint_port"])
        if peer.get("replace_allowed_ips"):
            state["ips"] = set()
        state["ips"] |= set(peer.get("allowed_ips", ()))

    def info(self, interface):
        self._check(interface)
        peers = []
        for pub, st in sorted(self.peers.items()):
            attrs = [["WGPEER_A_PUBLIC_KEY", pub]]
            if st["endpoint"]:
                attrs.append(
                    ["WGPEER_A_ENDPOINT", {"addr": st["endpoint"][0], "port": st["endpoint"][1]}]
                )
            attrs.append(
                ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": st["handshake"], "tv_nsec": 0}]
            )
            attrs += [["WGPEER_A_RX_BYTES", 1], ["WGPEER_A_TX_BYTES", 2]]
            ips = [_allowed_ip(x) for x in sorted(st["ips"])]
            if self.split and len(ips) > 1:  # the kernel continues a peer in the next message
                peers.append({"attrs": [*attrs, ["WGPEER_A_ALLOWEDIPS", ips[:1]]]})
                peers.append(
                    {"attrs": [["WGPEER_A_PUBLIC_KEY", pub], ["WGPEER_A_ALLOWEDIPS", ips[1:]]]}
                )
            else:
                peers.append({"attrs": [*attrs, ["WGPEER_A_ALLOWEDIPS", ips]]})
        device = [["WGDEVICE_A_IFINDEX", 7], ["WGDEVICE_A_IFNAME", interface]]
        if self.private_key:
            device.append(["WGDEVICE_A_PRIVATE_KEY", self.private_key])
            device.append(["WGDEVICE_A_PUBLIC_KEY", wgkeys.public_key(self.private_key)])
        device.append(["WGDEVICE_A_LISTEN_PORT", self.listen_port])
        chunks = [[p] for p in peers] if self.split else [peers]
        msgs = []
        for i, chunk in enumerate(chunks or [[]]):
            attrs = list(device) if i == 0 else [["WGDEVICE_A_IFINDEX", 7]]
            msgs.append(_roundtrip([*attrs, ["WGDEVICE_A_PEERS", chunk]]))
        return msgs

    def state(self) -> dict:
        return {
            pub: (
                f"{st['endpoint'][0]}:{st['endpoint'][1]}" if st["endpoint"] else None,
                frozenset(st["ips"]),
            )
            for pub, st in self.peers.items()
        }


def _allowed_ip(cidr: str) -> dict:
    ip, _, plen = cidr.partition("/")
    return {
        "attrs": [
            ["WGALLOWEDIP_A_FAMILY", socket.AF_INET],
            ["WGALLOWEDIP_A_IPADDR", socket.inet_pton(socket.AF_INET, ip)],
            ["WGALLOWEDIP_A_CIDR_MASK", int(plen)],
        ]
    }


def _roundtrip(attrs) -> wgmsg:
    msg = wgmsg()
    msg["cmd"], msg["version"], msg["attrs"] = 0, 1, attrs
    msg.encode()
    out = wgmsg(msg.data)
    out.decode()
    return out


KEYS = [wgkeys.public_key(wgkeys.generate_private_key()) for _ in range(4)]


def peer(i: int, endpoint: str | None = None, ips: tuple[str, ...] | None = None) -> WgPeer:
    return WgPeer(
        public_key=KEYS[i],
        endpoint=endpoint or f"198.18.0.{i + 2}:51820",
        allowed_ips=ips or (f"100.64.0.{i + 2}/32",),
        node=f"node{i}",
    )


def spec(*peers: WgPeer, address="100.64.0.1/24", port=51820) -> WireGuard:
    return WireGuard(name="otwg0", address=address, listen_port=port, mtu=1440, peers=peers)


def expected(desired: WireGuard) -> dict:
    return {p.public_key: (p.endpoint, frozenset(p.allowed_ips)) for p in desired.peers}


@pytest.fixture
def fake():
    links = FakeLinks()
    wg = FakeWireGuard(links, split=True)
    key = wgkeys.generate_private_key()
    applier = WireGuardApplier(links, private_key=key, backend="kernel", wg_factory=lambda: wg)
    return applier, links, wg


async def beat(applier: WireGuardApplier, desired: WireGuard, seen: Observed | None = None) -> int:
    """One heartbeat's WireGuard step (observe with the link dump → plan → apply): its writes."""
    result = await applier.reconcile(desired, seen or applier._links.seen())
    assert result.errors == (), result.errors
    assert result.reached == {"otwg0"}
    return result.writes


async def test_cold_apply_then_noop(fake):
    applier, links, wg = fake
    desired = spec(peer(0), peer(1, ips=("100.64.0.3/32", "10.1.0.0/16")))
    # create + (key, port) + 2 peers + mtu, address, up
    assert await beat(applier, desired) == 1 + 2 + 2 + 3
    assert applier.backend_name == "kernel"
    assert wg.state() == expected(desired)
    assert wg.private_key == applier.private_key and wg.listen_port == 51820
    link = links.links["otwg0"]
    assert (link.mtu, link.up, link.addresses) == (1440, True, {"100.64.0.1/24"})
    sets, link_writes = len(wg.sets), len(links.writes)
    assert await beat(applier, desired) == 0
    assert (len(wg.sets), len(links.writes)) == (sets, link_writes)  # zero writes on no-op
    assert applier.desired(Snapshot(node="n1", version=1)) is None  # silence: nothing to do


async def test_second_reconcile_plans_nothing(fake):
    applier, links, _ = fake
    desired = spec(peer(0), peer(1))
    await beat(applier, desired)
    again = applier.plan(desired, await applier.observe(links.seen()))
    assert again.empty and again.device.writes == 0 and again.link == ()


async def test_the_heartbeats_link_is_used_not_read_again(fake):
    applier, links, _ = fake
    desired = spec(peer(0))
    await beat(applier, desired)  # cold: the device was created, so its link was read once
    reads, lookups = links.reads, links.lookups
    assert await beat(applier, desired) == 0
    stale = Link(**{**_fields(links.links["otwg0"]), "mtu": 1280})  # what the dump saw
    assert await beat(applier, desired, Observed(links={"otwg0": stale})) == 1  # MTU back
    assert links.links["otwg0"].mtu == 1440
    assert (links.reads, links.lookups) == (reads, lookups)  # no RTM_GETLINK, by name or index


async def test_only_changed_peers_are_written(fake):
    applier, _, wg = fake
    await beat(applier, spec(peer(0), peer(1), peer(2)))
    wg.sets.clear()
    new = spec(peer(0), peer(1, endpoint="198.18.0.99:51820"), peer(3))
    assert await beat(applier, new) == 3
    touched = {s["peer"]["public_key"]: s["peer"] for s in wg.sets}
    assert set(touched) == {KEYS[1], KEYS[2], KEYS[3]}  # peer 0 untouched
    assert touched[KEYS[2]] == {"public_key": KEYS[2], "remove": True}
    assert touched[KEYS[1]]["update_only"] and "allowed_ips" not in touched[KEYS[1]]
    assert wg.state() == expected(new)


async def test_foreign_state_is_repaired(fake):
    applier, links, wg = fake
    desired = spec(peer(0))
    await beat(applier, desired)
    wg.peers[KEYS[0]]["ips"] = {"10.0.0.0/8"}  # hand edits
    wg.listen_port = 1
    wg.peers[KEYS[3]] = {"endpoint": None, "ips": set(), "handshake": 0}
    links.links["otwg0"] = Link(
        name="otwg0", kind="wireguard", mtu=1500, up=False, addresses=frozenset({"10.9.9.9/8"})
    )
    assert await beat(applier, desired) == 1 + 1 + 1 + 4  # port, peer fix, stray peer, 4 link
    assert wg.state() == expected(desired) and wg.listen_port == 51820
    assert links.links["otwg0"].addresses == {"100.64.0.1/24"}
    assert await beat(applier, desired) == 0


async def test_key_rotation_writes_only_the_key(fake):
    applier, _, wg = fake
    await beat(applier, spec(peer(0)))
    applier.private_key = wgkeys.generate_private_key()
    wg.sets.clear()
    assert await beat(applier, spec(peer(0))) == 1
    assert wg.sets == [{"listen_port": None, "private_key": applier.private_key, "peer": None}]


async def test_a_failing_peer_is_a_typed_error_and_does_not_stop_the_others(fake):
    applier, links, wg = fake
    desired = spec(peer(0), peer(1), peer(2))
    wg.fail_for = {KEYS[1]}  # EINVAL: the kernel refuses it, retrying will not help
    result = await applier.reconcile(desired, links.seen())
    assert result.errors == (
        ApplyError(
            "otwg0", "configure", f"peer {KEYS[1][:8]}…: Invalid argument", errno=errno.EINVAL
        ),
    )
    assert result.errors[0].temporary is False
    assert result.writes == 1 + 2 + 2 + 3  # create, key+port, peers 0 and 2, the whole link
    assert set(wg.state()) == {KEYS[0], KEYS[2]} and links.links["otwg0"].up
    wg.fail_for = set()
    assert await beat(applier, desired) == 1  # only peer 1 is left to write


async def test_a_busy_kernel_is_a_temporary_error(fake):
    applier, links, wg = fake
    desired = spec(peer(0))
    await beat(applier, desired)
    wg.fail_for, wg.fail_code = {KEYS[1]}, errno.EBUSY
    result = await applier.reconcile(spec(peer(0), peer(1)), links.seen())
    assert result.writes == 0 and result.reached == {"otwg0"}
    (error,) = result.errors
    assert (error.device, error.op, error.errno, error.temporary) == (
        "otwg0", "configure", errno.EBUSY, True,
    )  # fmt: skip


async def test_a_device_deleted_after_the_dump_is_made_again_at_once(fake):
    applier, links, wg = fake
    desired = spec(peer(0))
    await beat(applier, desired)
    seen = links.seen()
    links.links.pop("otwg0")  # deleted by hand after the dump, before the genl dump
    wg.private_key, wg.listen_port, wg.peers = None, 0, {}  # its config went with it
    assert await beat(applier, desired, seen) == 1 + 2 + 1 + 3
    assert links.writes[-4:] == ["CreateWireGuard otwg0", "SetMtu otwg0", "AddAddress otwg0",
                                 "SetUp otwg0"]  # fmt: skip


async def test_peers_health_and_teardown(fake):
    applier, links, wg = fake
    assert await applier.peers() == []  # no device yet: nothing, no error
    await beat(applier, spec(peer(0)))
    wg.peers[KEYS[0]]["handshake"] = 1_700_000_000
    (health,) = await applier.peers()
    assert (health.public_key, health.node, health.endpoint) == (
        KEYS[0],
        "node0",
        "198.18.0.2:51820",
    )
    assert (health.latest_handshake, health.rx_bytes, health.tx_bytes) == (1_700_000_000, 1, 2)
    await applier.remove()
    assert "otwg0" not in links.links


async def test_a_userspace_tun_is_replaced_by_a_kernel_device(fake):
    applier, links, wg = fake
    links.links["otwg0"] = Link(name="otwg0", kind="tun", mtu=1420, up=True, index=3)
    assert await beat(applier, spec()) == 2 + 2 + 3  # delete+create, key+port, link
    assert links.links["otwg0"].kind == "wireguard"
    assert links.writes[0] == "DeleteLink otwg0" and links.lookups == 0  # by the dump's index


async def test_bad_snapshot_changes_nothing(fake):
    applier, links, wg = fake
    bad = spec(WgPeer(public_key="bogus", endpoint="1.2.3.4:1", allowed_ips=()))
    with pytest.raises(ValueError):
        await applier.reconcile(bad, links.seen())
    with pytest.raises(ValueError):
        await applier.reconcile(
            WireGuard(name="eth0", address="100.64.0.1/24", listen_port=1, mtu=1440), links.seen()
        )
    assert links.writes == [] and wg.sets == []


async def test_every_transition_converges_in_any_order(fake):
    applier, _, wg = fake
    states = [
        spec(),
        spec(peer(0)),
        spec(peer(0), peer(1), peer(2)),
        spec(peer(1, endpoint="198.18.0.50:1"), peer(3, ips=("100.64.0.5/32", "10.5.0.0/16"))),
        spec(peer(2), peer(3), address="100.64.0.9/24", port=51821),
    ]
    rng = random.Random(7)
    pairs = list(itertools.permutations(states, 2))
    rng.shuffle(pairs)
    for a, b in pairs:
        await beat(applier, a)
        await beat(applier, b)
        assert wg.state() == expected(b)
        assert await beat(applier, b) == 0


async def test_fake_speaks_real_pyroute2_shapes():
    links = FakeLinks()
    await links.apply(LinkPlan(actions=(CreateWireGuard("otwg0"),)))
    wg = FakeWireGuard(links)
    wg.set(
        "otwg0",
        peer={
            "public_key": KEYS[0],
            "endpoint_addr": "198.18.0.2",
            "endpoint_port": 1,
            "allowed_ips": ["100.64.0.2/32"],
        },
    )
    (msg,) = wg.info("otwg0")
    (p,) = msg.get_attr("WGDEVICE_A_PEERS")
    assert p.get_attr("WGPEER_A_PUBLIC_KEY") == KEYS[0].encode()  # pyroute2 gives bytes
    assert base64.b64decode(p.get_attr("WGPEER_A_PUBLIC_KEY")) == base64.b64decode(KEYS[0])
    assert p.get_attr("WGPEER_A_ENDPOINT")["addr"] == "198.18.0.2"
