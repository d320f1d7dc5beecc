"""Pure WireGuard planning for ``otwg0``: what the device should become, as plain values.

Owns the data (``WgObserved``/``ObservedDevice``/``ObservedPeer`` as read back, ``WgPlan``/
``DevicePlan``/``PeerPlan`` as the writes to make), the diff (``plan``, ``plan_peers``,
``plan_device``, ``plan_link``; ``plan_peer_change``: only the peers a mesh change touched),
snapshot ``validate``, and the two wire formats: wireguard-go's UAPI text (``render_set``,
``parse_get``) and pyroute2's genl dump (``parse_genl``). Keys are base64 here and hex on the
UAPI wire.

Everything is a pure function of its arguments: this module does no I/O (no sockets, netlink,
files or processes) and never logs. ``agent.wireguard.applier`` observes, calls these and applies.
"""

import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from agent.errors import WireGuardError
from agent.links.model import Action, AddAddress, DelAddress, Link, SetMtu, SetUp
from agent.wireguard import keys as wgkeys
from schemas.desired import WgPeer, WireGuard

# --- plain data -------------------------------------------------------------------------------


class ObservedPeer(msgspec.Struct, frozen=True, kw_only=True):
    public_key: str  # base64
    endpoint: str | None = None  # normalised "ip:port" / "[ip6]:port"
    allowed_ips: frozenset[str] = frozenset()  # normalised networks
    latest_handshake: float = 0.0  # unix time, 0 = never
    rx_bytes: int = 0
    tx_bytes: int = 0


class ObservedDevice(msgspec.Struct, frozen=True, kw_only=True):
    private_key: str | None = None  # base64, as stored (clamped)
    listen_port: int = 0
    peers: tuple[ObservedPeer, ...] = ()


class PeerChange(msgspec.Struct, frozen=True, kw_only=True):
    """One peer write. For an update, ``None`` means "this field stays as it is"."""

    public_key: str
    endpoint: str | None = None
    allowed_ips: tuple[str, ...] | None = None


class PeerPlan(msgspec.Struct, frozen=True, kw_only=True):
    add: tuple[PeerChange, ...] = ()
    update: tuple[PeerChange, ...] = ()
    remove: tuple[str, ...] = ()  # public keys

    @property
    def writes(self) -> int:
        return len(self.add) + len(self.update) + len(self.remove)


class DevicePlan(msgspec.Struct, frozen=True, kw_only=True):
    private_key: str | None = None  # base64 to set, None = keep
    listen_port: int | None = None
    peers: PeerPlan = PeerPlan()

    @property
    def writes(self) -> int:
        return (self.private_key is not None) + (self.listen_port is not None) + self.peers.writes


class WgObserved(msgspec.Struct, frozen=True, kw_only=True):
    """``otwg0`` as read: the link (from the heartbeat's dump) and, when the device answers
    (kernel genl / wireguard-go's socket), its keys and peers."""

    link: Link | None = None
    device: ObservedDevice | None = None  # None: no working device, create (or start) it


class WgPlan(msgspec.Struct, frozen=True, kw_only=True):
    desired: WireGuard
    seen: Link | None = None  # otwg0's link as observed (its ifindex spares a lookup)
    create: bool = False  # then ``device``/``link`` are planned after the device exists
    device: DevicePlan = DevicePlan()
    link: tuple[Action, ...] | None = None  # None: the link must be read first

    @property
    def empty(self) -> bool:
        return not self.create and not self.device.writes and self.link == ()


# --- pure functions ---------------------------------------------------------------------------


def normalize_endpoint(endpoint: str | None) -> str | None:
    """``"ip:port"`` (``"[ip6]:port"``) in canonical form; ``""``/None = no endpoint."""
    if not endpoint:
        return None
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {endpoint!r} is not ip:port")
    ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    return f"[{ip}]:{int(port)}" if ip.version == 6 else f"{ip}:{int(port)}"


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def normalize_allowed(allowed: Iterable[str]) -> tuple[str, ...]:
    # WireGuard masks host bits, so 10.0.0.1/24 is stored (and reported) as 10.0.0.0/24
    return tuple(sorted({str(ipaddress.ip_network(a, strict=False)) for a in allowed}))


def plan_peers(
    desired: Sequence[WgPeer], observed: Sequence[ObservedPeer], self_public: str | None = None
) -> PeerPlan:
    """Diff peers by public key: add new, update changed fields, remove departed, skip equal.

    A desired peer with our own public key is dropped (WireGuard refuses it, so it would be
    re-added on every apply). Raises ``ValueError`` on malformed input, before any write.
    """
    have = {p.public_key: p for p in observed}
    want: dict[str, WgPeer] = {}
    for p in desired:
        wgkeys.decode_key(p.public_key)
        if p.public_key != self_public:
            want.setdefault(p.public_key, p)
    add, update = [], []
    for key, p in sorted(want.items()):
        endpoint, allowed = normalize_endpoint(p.endpoint), normalize_allowed(p.allowed_ips)
        cur = have.get(key)
        if cur is None:
            add.append(PeerChange(public_key=key, endpoint=endpoint, allowed_ips=allowed))
            continue
        new_endpoint = endpoint if endpoint is not None and endpoint != cur.endpoint else None
        new_allowed = allowed if frozenset(allowed) != cur.allowed_ips else None
        if new_endpoint is not None or new_allowed is not None:
            update.append(
                PeerChange(public_key=key, endpoint=new_endpoint, allowed_ips=new_allowed)
            )
    remove = tuple(sorted(have.keys() - want.keys()))
    return PeerPlan(add=tuple(add), update=tuple(update), remove=remove)


def plan_peer_change(
    gained: Iterable[WgPeer], lost: Iterable[WgPeer], self_public: str | None = None
) -> PeerPlan:
    """The writes of a mesh change, given the device holds exactly the peers before it: each
    peer gained set (an update when its key was lost, i.e. the peer changed), each key lost and
    not gained again removed; never our own key (as ``plan_peers``). Cost: the change, never
    the peers that stay. Raises ``ValueError`` on malformed input, before any write."""
    kept = {p.public_key for p in gained}
    old = {p.public_key for p in lost} - {self_public}
    add, update = [], []
    for p in sorted(gained):
        wgkeys.decode_key(p.public_key)
        if p.public_key == self_public:
            continue
        change = PeerChange(
            public_key=p.public_key,
            endpoint=normalize_endpoint(p.endpoint),
            allowed_ips=normalize_allowed(p.allowed_ips),
        )
        (update if p.public_key in old else add).append(change)
    return PeerPlan(add=tuple(add), update=tuple(update), remove=tuple(sorted(old - kept)))


def plan_device(
    desired: WireGuard, private_key: str, observed: ObservedDevice, self_public: str | None = None
) -> DevicePlan:
    key = wgkeys.clamp(private_key)  # both kernel and wireguard-go report the clamped key
    return DevicePlan(
        private_key=key if observed.private_key != key else None,
        listen_port=desired.listen_port if observed.listen_port != desired.listen_port else None,
        peers=plan_peers(desired.peers, observed.peers, self_public),
    )


def plan_link(desired: WireGuard, link: Link) -> list[Action]:
    """MTU, exactly one IPv4 address (the tunnel address), administratively up."""
    want = str(ipaddress.ip_interface(desired.address))
    have = {str(ipaddress.ip_interface(a)) for a in link.addresses}
    actions: list[Action] = []
    if link.mtu != desired.mtu:
        actions.append(SetMtu(link.name, desired.mtu))
    actions += [DelAddress(link.name, a) for a in sorted(have - {want})]
    if want not in have:
        actions.append(AddAddress(link.name, want))
    if not link.up:
        actions.append(SetUp(link.name))
    return actions


def plan(
    desired: WireGuard, private_key: str, observed: WgObserved, self_public: str | None = None
) -> WgPlan:
    """Device (key, port, peers) and link (MTU, address, up) writes; raises ``ValueError`` on
    a snapshot we could only half apply, before any write."""
    validate(desired)
    if observed.device is None:
        return WgPlan(desired=desired, seen=observed.link, create=True)
    return WgPlan(
        desired=desired,
        seen=observed.link,
        device=plan_device(desired, private_key, observed.device, self_public),
        link=tuple(plan_link(desired, observed.link)) if observed.link is not None else None,
    )


def validate(desired: WireGuard) -> None:
    """Raise ``ValueError`` for a snapshot we could only half apply."""
    ipaddress.ip_interface(desired.address)
    if not 0 <= desired.listen_port < 65536:
        raise ValueError(f"listen port {desired.listen_port} out of range")
    if not 576 <= desired.mtu <= 65535:
        raise ValueError(f"WireGuard MTU {desired.mtu} out of range")
    plan_peers(desired.peers, ())


def render_set(plan: DevicePlan) -> str:
    """UAPI ``set=1`` transaction: removes, then updates, then adds (keys in hex)."""
    lines = ["set=1"]
    if plan.private_key is not None:
        lines.append(f"private_key={wgkeys.b64_to_hex(plan.private_key)}")
    if plan.listen_port is not None:
        lines.append(f"listen_port={plan.listen_port}")
    for key in plan.peers.remove:
        lines += [f"public_key={wgkeys.b64_to_hex(key)}", "remove=true"]
    for change, only in [(c, True) for c in plan.peers.update] + [
        (c, False) for c in plan.peers.add
    ]:
        lines.append(f"public_key={wgkeys.b64_to_hex(change.public_key)}")
        if only:
            lines.append("update_only=true")
        if change.endpoint is not None:
            lines.append(f"endpoint={change.endpoint}")
        if change.allowed_ips is not None:
            lines.append("replace_allowed_ips=true")
            lines += [f"allowed_ip={a}" for a in change.allowed_ips]
    return "\n".join(lines) + "\n\n"


def parse_get(text: str) -> ObservedDevice:
    """Parse a UAPI ``get=1`` answer (without or with its ``errno=`` line)."""
    dev: dict[str, Any] = {}
    peers: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line:
            continue
        key, _, value = line.partition("=")
        if key == "errno":
            if value != "0":
                raise WireGuardError(f"UAPI get failed: errno={value}")
        elif key == "public_key":
            peers.append({"public_key": wgkeys.hex_to_b64(value), "allowed_ips": set()})
        elif not peers:
            if key == "private_key":
                dev["private_key"] = wgkeys.hex_to_b64(value)
            elif key == "listen_port":
                dev["listen_port"] = int(value)
        else:
            peer = peers[-1]
            if key == "endpoint":
                peer["endpoint"] = normalize_endpoint(value)
            elif key == "allowed_ip":
                peer["allowed_ips"].add(str(ipaddress.ip_network(value, strict=False)))
            elif key == "last_handshake_time_sec":
                peer["sec"] = int(value)
            elif key == "last_handshake_time_nsec":
                peer["nsec"] = int(value)
            elif key in ("rx_bytes", "tx_bytes"):
                peer[key] = int(value)
    return ObservedDevice(**dev, peers=tuple(_observed_peer(p) for p in peers))


def _observed_peer(p: dict[str, Any]) -> ObservedPeer:
    sec, nsec = p.pop("sec", 0), p.pop("nsec", 0)
    p["allowed_ips"] = frozenset(p["allowed_ips"])
    return ObservedPeer(**p, latest_handshake=sec + nsec / 1e9 if sec else 0.0)


def parse_genl(msgs: Iterable[Any]) -> ObservedDevice:
    """Merge a ``WireGuard.info()`` dump; a large device spans several messages, and one peer
    may continue (more allowed IPs) in the next message."""
    dev: dict[str, Any] = {}
    peers: dict[str, dict[str, Any]] = {}
    for msg in msgs:
        if (key := msg.get_attr("WGDEVICE_A_PRIVATE_KEY")) is not None:
            dev["private_key"] = _text(key)
        if (port := msg.get_attr("WGDEVICE_A_LISTEN_PORT")) is not None:
            dev["listen_port"] = port
        for p in msg.get_attr("WGDEVICE_A_PEERS") or ():
            pub = _text(p.get_attr("WGPEER_A_PUBLIC_KEY"))
            peer = peers.setdefault(pub, {"public_key": pub, "allowed_ips": set()})
            if (ep := p.get_attr("WGPEER_A_ENDPOINT")) is not None and ep.get("addr"):
                host = f"[{ep['addr']}]" if ":" in ep["addr"] else ep["addr"]
                peer["endpoint"] = normalize_endpoint(f"{host}:{ep['port']}")
            if (hs := p.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")) is not None:
                peer["sec"], peer["nsec"] = hs["tv_sec"], hs["tv_nsec"]
            for attr, field in (
                ("WGPEER_A_RX_BYTES", "rx_bytes"),
                ("WGPEER_A_TX_BYTES", "tx_bytes"),
            ):
                if (value := p.get_attr(attr)) is not None:
                    peer[field] = value
            for a in p.get_attr("WGPEER_A_ALLOWEDIPS") or ():
                if a.get("addr"):
                    peer["allowed_ips"].add(str(ipaddress.ip_network(a["addr"], strict=False)))
    return ObservedDevice(**dev, peers=tuple(_observed_peer(p) for p in peers.values()))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
