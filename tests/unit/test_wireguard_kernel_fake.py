"""The kernel backend against a fake device that speaks pyroute2's WireGuard API.

The fake answers ``info()`` with real pyroute2 ``wgmsg`` objects (encoded, then decoded, as the
kernel's dump would be), and applies ``set()`` with the kernel's semantics (clamped private key,
update_only, replace_allowed_ips, remove). Every write is recorded.
"""

import base64
import errno
import itertools
import random
import socket

import pytest
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import wgmsg

from agent import wgkeys
from agent.model import AddAddress, DelAddress, Link, SetMtu, SetUp
from agent.wireguard import WireGuardApplier
from schemas.desired import WgPeer, WireGuard

pytestmark = pytest.mark.timeout(20)


class FakeLinks:
    """The applier's async ``Links`` seam, in memory."""

    def __init__(self):
        self.links: dict[str, Link] = {}
        self.writes: list[str] = []
        self.reads = 0

    async def observe(self, name):
        self.reads += 1
        return self.links.get(name)

    async def create_wireguard(self, name):
        self.writes.append(f"create {name}")
        self.links[name] = Link(name=name, kind="wireguard", mtu=1420, up=False)

    async def execute(self, name, actions):
        link = self.links[name]
        for a in actions:
            self.writes.append(f"{type(a).__name__} {name}")
            match a:
                case SetMtu(mtu=mtu):
                    link = Link(**{**_fields(link), "mtu": mtu})
                case SetUp():
                    link = Link(**{**_fields(link), "up": True})
                case AddAddress(address=x):
                    link = Link(**{**_fields(link), "addresses": link.addresses | {x}})
                case DelAddress(address=x):
                    link = Link(**{**_fields(link), "addresses": link.addresses - {x}})
        self.links[name] = link

    async def delete(self, name):
        self.writes.append(f"delete {name}")
        self.links.pop(name, None)


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
            raise NetlinkError(errno.EINVAL)
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


async def test_cold_apply_then_noop(fake):
    applier, links, wg = fake
    desired = spec(peer(0), peer(1, ips=("100.64.0.3/32", "10.1.0.0/16")))
    # create + (key, port) + 2 peers + mtu, address, up
    assert await applier.apply(desired) == 1 + 2 + 2 + 3
    assert applier.backend_name == "kernel"
    assert wg.state() == expected(desired)
    assert wg.private_key == applier.private_key and wg.listen_port == 51820
    link = links.links["otwg0"]
    assert (link.mtu, link.up, link.addresses) == (1440, True, {"100.64.0.1/24"})
    sets, link_writes = len(wg.sets), len(links.writes)
    assert await applier.apply(desired) == 0
    assert (len(wg.sets), len(links.writes)) == (sets, link_writes)  # zero writes on no-op
    assert await applier.apply(None) == 0


async def test_callers_observation_saves_a_link_read_but_never_hides_drift(fake):
    applier, links, _ = fake
    desired = spec(peer(0))
    await applier.apply(desired)
    reads = links.reads
    assert await applier.apply(desired, links.links["otwg0"]) == 0
    assert links.reads == reads + 1  # the backend's device check only, not a second link read
    stale = Link(**{**_fields(links.links["otwg0"]), "mtu": 1280})  # what the caller saw
    assert await applier.apply(desired, stale) == 1  # it is acted on: MTU back to 1440
    assert links.links["otwg0"].mtu == 1440


async def test_only_changed_peers_are_written(fake):
    applier, _, wg = fake
    await applier.apply(spec(peer(0), peer(1), peer(2)))
    wg.sets.clear()
    new = spec(peer(0), peer(1, endpoint="198.18.0.99:51820"), peer(3))
    assert await applier.apply(new) == 3
    touched = {s["peer"]["public_key"]: s["peer"] for s in wg.sets}
    assert set(touched) == {KEYS[1], KEYS[2], KEYS[3]}  # peer 0 untouched
    assert touched[KEYS[2]] == {"public_key": KEYS[2], "remove": True}
    assert touched[KEYS[1]]["update_only"] and "allowed_ips" not in touched[KEYS[1]]
    assert wg.state() == expected(new)


async def test_foreign_state_is_repaired(fake):
    applier, links, wg = fake
    desired = spec(peer(0))
    await applier.apply(desired)
    wg.peers[KEYS[0]]["ips"] = {"10.0.0.0/8"}  # hand edits
    wg.listen_port = 1
    wg.peers[KEYS[3]] = {"endpoint": None, "ips": set(), "handshake": 0}
    links.links["otwg0"] = Link(
        name="otwg0", kind="wireguard", mtu=1500, up=False, addresses=frozenset({"10.9.9.9/8"})
    )
    assert await applier.apply(desired) == 1 + 1 + 1 + 4  # port, peer fix, stray peer, 4 link
    assert wg.state() == expected(desired) and wg.listen_port == 51820
    assert links.links["otwg0"].addresses == {"100.64.0.1/24"}
    assert await applier.apply(desired) == 0


async def test_key_rotation_writes_only_the_key(fake):
    applier, _, wg = fake
    await applier.apply(spec(peer(0)))
    applier.private_key = wgkeys.generate_private_key()
    wg.sets.clear()
    assert await applier.apply(spec(peer(0))) == 1
    assert wg.sets == [{"listen_port": None, "private_key": applier.private_key, "peer": None}]


async def test_a_failing_peer_does_not_stop_the_others(fake):
    applier, _, wg = fake
    wg.fail_for = {KEYS[1]}
    with pytest.raises(ExceptionGroup) as info:
        await applier.apply(spec(peer(0), peer(1), peer(2)))
    assert len(info.value.exceptions) == 1
    assert set(wg.state()) == {KEYS[0], KEYS[2]}
    wg.fail_for = set()
    assert await applier.apply(spec(peer(0), peer(1), peer(2))) == 1 + 3  # peer 1 + link (missed)


async def test_peers_health_and_teardown(fake):
    applier, links, wg = fake
    assert await applier.peers() == []  # no device yet: nothing, no error
    await applier.apply(spec(peer(0)))
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
    links.links["otwg0"] = Link(name="otwg0", kind="tun", mtu=1420, up=True)
    assert await applier.apply(spec()) == 2 + 2 + 3  # delete+create, key+port, link
    assert links.links["otwg0"].kind == "wireguard"


async def test_bad_snapshot_changes_nothing(fake):
    applier, links, wg = fake
    bad = spec(WgPeer(public_key="bogus", endpoint="1.2.3.4:1", allowed_ips=()))
    with pytest.raises(ValueError):
        await applier.apply(bad)
    with pytest.raises(ValueError):
        await applier.apply(
            WireGuard(name="eth0", address="100.64.0.1/24", listen_port=1, mtu=1440)
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
        await applier.apply(a)
        await applier.apply(b)
        assert wg.state() == expected(b)
        assert await applier.apply(b) == 0


async def test_fake_speaks_real_pyroute2_shapes():
    links = FakeLinks()
    await links.create_wireguard("otwg0")
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
