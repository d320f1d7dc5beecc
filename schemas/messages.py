"""Agent → controller messages: acks of applied snapshots and periodic health."""

import msgspec

from schemas import SCHEMA_VERSION, Version


class Ack(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    version: Version  # the snapshot version this ack answers (the refused one when ok is False)
    applied_version: Version  # newest version the data plane holds
    digest: str = ""
    ok: bool = True
    error: str | None = None
    duration_ms: float = 0.0
    changes: int = 0  # kernel writes this apply made (0 on a no-op heartbeat)
    sent_at: float = 0.0
    schema: int = SCHEMA_VERSION


class PeerHealth(msgspec.Struct, frozen=True, kw_only=True):
    public_key: str
    node: str = ""
    endpoint: str | None = None
    latest_handshake: float = 0.0  # unix time, 0 = never
    rx_bytes: int = 0
    tx_bytes: int = 0


class Health(msgspec.Struct, frozen=True, kw_only=True):
    node: str
    applied_version: Version
    ok: bool
    started_at: float
    sent_at: float
    snapshots_received: int = 0
    snapshots_applied: int = 0
    snapshots_rejected: int = 0
    apply_errors: int = 0
    last_error: str | None = None
    last_snapshot_at: float = 0.0
    devices: int = 0
    # every managed tap → carrier: False while no hypervisor holds the tap open (VM not attached)
    taps: dict[str, bool] = {}
    wireguard_backend: str | None = None
    wg_public_key: str | None = None
    tunnel_ip: str | None = None
    peers: tuple[PeerHealth, ...] = ()
    # packets the data plane dropped, by reason (agent.nft.rules.REASONS: port security, host
    # and forward isolation, VXLAN guard); kept across rule reloads, zeroed by a reboot
    drops: dict[str, int] = {}
    schema: int = SCHEMA_VERSION
