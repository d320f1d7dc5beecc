"""Agent → controller messages: acks of applied snapshots and periodic health.

Every field is bounded: the controller keeps the last ack and health of each node and returns
them in ``status``, so one node's 600 KB error text once made every operator's ``status`` fail
(found by review). A report over a bound is refused as malformed; the agent ``clip``s its texts.
"""

from typing import Annotated

import msgspec

from schemas import SCHEMA_VERSION, Version

MAX_TEXT = 4096  # an error for operators, not a log
MAX_REPORTED_TAPS = 4096
MAX_REPORTED_PEERS = 10_000
MAX_DROP_REASONS = 32

Name = Annotated[str, msgspec.Meta(max_length=64)]  # node names, digests, keys, backends
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
Address = Annotated[str, msgspec.Meta(max_length=64)]  # "ip/len", "ip:port", "[ip6]:port"


def clip(text: str | None) -> str | None:
    """``text`` cut to at most ``MAX_TEXT`` characters, saying how much was cut."""
    if text is None or len(text) <= MAX_TEXT:
        return text
    keep = MAX_TEXT - 64  # room for the note
    return f"{text[:keep]} … ({len(text) - keep} more characters)"


class Ack(msgspec.Struct, frozen=True, kw_only=True):
    node: Name
    version: Version  # the snapshot version this ack answers (the refused one when ok is False)
    applied_version: Version  # newest version the data plane holds
    digest: Name = ""
    ok: bool = True
    error: Text | None = None
    duration_ms: float = 0.0
    changes: int = 0  # kernel writes this apply made (0 on a no-op heartbeat)
    sent_at: float = 0.0
    schema: int = SCHEMA_VERSION


class PeerHealth(msgspec.Struct, frozen=True, kw_only=True):
    public_key: Name
    node: Name = ""
    endpoint: Address | None = None
    latest_handshake: float = 0.0  # unix time, 0 = never
    rx_bytes: int = 0
    tx_bytes: int = 0


class Health(msgspec.Struct, frozen=True, kw_only=True):
    node: Name
    applied_version: Version
    ok: bool
    started_at: float
    sent_at: float
    snapshots_received: int = 0
    snapshots_applied: int = 0
    snapshots_rejected: int = 0
    apply_errors: int = 0
    last_error: Text | None = None
    last_snapshot_at: float = 0.0
    devices: int = 0
    # every managed tap → carrier: False while no hypervisor holds the tap open (VM not attached)
    taps: Annotated[dict[Name, bool], msgspec.Meta(max_length=MAX_REPORTED_TAPS)] = {}
    wireguard_backend: Name | None = None
    wg_public_key: Name | None = None
    tunnel_ip: Address | None = None
    peers: Annotated[tuple[PeerHealth, ...], msgspec.Meta(max_length=MAX_REPORTED_PEERS)] = ()
    # packets the data plane dropped, by reason (agent.nft.rules.REASONS: port security, host
    # and forward isolation, VXLAN guard); kept across rule reloads, zeroed by a reboot
    drops: Annotated[dict[Name, int], msgspec.Meta(max_length=MAX_DROP_REASONS)] = {}
    # heartbeats that skipped the full reconcile (same content, no kernel change) and full ones
    heartbeats_skipped: int = 0
    heartbeats_reconciled: int = 0
    schema: int = SCHEMA_VERSION
