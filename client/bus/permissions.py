"""The bus's roster and permission matrix, and the nats-server configuration text they render to.

Pure: a ``Roster`` (who exists, with which public nkey) goes in, configuration text comes out.
Nothing here reads files, generates keys or talks to a server (``client.bus.files`` does), so the
whole matrix is unit-testable as text and regeneration after add/revoke is deterministic.

Every identity gets a private inbox prefix derived from its public key (``_INBOX.<key>``) and may
subscribe only there, so no one can read another identity's replies. The controller, trusted with
every answer anyway, may publish into any inbox (``allow_responses`` is not used: nats-server
forgets those grants on a configuration reload, so an API reply in flight while a node is added
or revoked would be refused, as seen in the lab). It answers only into ``_INBOX.…`` subjects
(``controller.api``): a caller chooses the reply subject, and the controller may publish where no
caller may, so a reply aimed at desired state or the intent bucket is refused, not sent.
"""

import json
import re

import msgspec

from schemas import naming
from schemas.api import NODE_SCOPED_ENDPOINTS, READ_ENDPOINTS  # noqa: F401 (re-exported)
from schemas.bus import INBOX_ROOT, inbox_prefix, valid_public_key  # noqa: F401 (re-exported)

ROSTER_SCHEMA = 1
DEFAULT_BUCKET = "otherix"
DEFAULT_PORT = 4222

_BUCKET = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Roster(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Who may use the bus. Keys are public user nkeys (``U…``); the seeds live only in files."""

    schema: int = ROSTER_SCHEMA
    bucket: str = DEFAULT_BUCKET  # the controller's JetStream key-value bucket of intent
    port: int = DEFAULT_PORT
    hosts: tuple[str, ...] = ()  # names and IPs in the server certificate besides localhost
    server_dir: str  # this directory as nats-server sees it (certificates, authorization.conf)
    store_dir: str  # JetStream store as nats-server sees it; "" = given by its -sd flag
    controller: str
    admin: str
    viewer: str
    nodes: dict[str, str] = {}  # node name → public key


class Permissions(msgspec.Struct, frozen=True, kw_only=True):
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False


def validate(roster: Roster) -> None:
    """Raise ValueError naming the first bad field; a valid roster renders a valid config."""
    if roster.schema != ROSTER_SCHEMA:
        raise ValueError(f"roster schema {roster.schema} is not {ROSTER_SCHEMA}")
    if not _BUCKET.match(roster.bucket):
        raise ValueError(f"bucket {roster.bucket!r} is not 1-64 of A-Z a-z 0-9 _ -")
    if not 1 <= roster.port <= 65535:
        raise ValueError(f"port {roster.port} is not 1-65535")
    for role in ("controller", "admin", "viewer"):
        if not valid_public_key(getattr(roster, role)):
            raise ValueError(f"{role} key is not a public user nkey (U…)")
    for node, key in roster.nodes.items():
        if not naming.valid_id(node):
            raise ValueError(f"node name {node!r} is not a lowercase DNS label")
        if not valid_public_key(key):
            raise ValueError(f"node {node}: key is not a public user nkey (U…)")
    keys = [roster.controller, roster.admin, roster.viewer, *roster.nodes.values()]
    if len(set(keys)) != len(keys):
        raise ValueError("two identities share one key")


def _own_inbox(key: str) -> str:
    return inbox_prefix(key) + ".>"


def _watchers() -> tuple[str, ...]:
    return (naming.ack_subject("*"), naming.health_subject("*"))


def node_permissions(node: str, key: str) -> Permissions:
    return Permissions(
        publish=(
            naming.ack_subject(node),
            naming.health_subject(node),
            *(naming.node_api_subject(e, node) for e in NODE_SCOPED_ENDPOINTS),
        ),
        subscribe=(naming.desired_subject(node), _own_inbox(key)),
    )


def controller_permissions(key: str, bucket: str) -> Permissions:
    # The only identity on JetStream (the intent bucket's API and subjects; it uses no push
    # consumers, so it never acks deliveries). API replies go to the caller's inbox.
    return Permissions(
        publish=(naming.desired_subject("*"), "$JS.API.>", f"$KV.{bucket}.>", f"{INBOX_ROOT}.>"),
        subscribe=(naming.api_subject(">"), "$SRV.>", *_watchers(), _own_inbox(key)),
    )


def admin_permissions(key: str) -> Permissions:
    return Permissions(
        publish=(naming.api_subject(">"),), subscribe=(*_watchers(), _own_inbox(key))
    )


def viewer_permissions(key: str) -> Permissions:
    return Permissions(
        publish=tuple(naming.api_subject(e) for e in READ_ENDPOINTS),
        subscribe=(*_watchers(), _own_inbox(key)),
    )


def identities(roster: Roster) -> list[tuple[str, str, Permissions]]:
    """(label, public key, permissions) for every identity, roles first, nodes sorted."""
    out = [
        ("controller", roster.controller, controller_permissions(roster.controller, roster.bucket)),
        ("admin", roster.admin, admin_permissions(roster.admin)),
        ("viewer", roster.viewer, viewer_permissions(roster.viewer)),
    ]
    for node in sorted(roster.nodes):
        key = roster.nodes[node]
        out.append((f"node {node}", key, node_permissions(node, key)))
    return out


def _q(value: str) -> str:
    # JSON strings are valid nats-server config strings; quoting keeps '$JS…' from being read
    # as a variable reference.
    return json.dumps(value)


def _list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(_q(v) for v in values) + "]"


def render_authorization(roster: Roster) -> str:
    """authorization.conf: one user per identity, nothing allowed that is not listed."""
    validate(roster)
    lines = [
        "# Written by otherix-bus from roster.json; change it with otherix-bus, not by hand.",
        "authorization {",
        "  users = [",
    ]
    for label, key, perms in identities(roster):
        responses = ", allow_responses: true" if perms.allow_responses else ""
        lines += [
            f"    # {label}",
            f"    {{nkey: {_q(key)}, permissions: {{",
            f"      publish: {{allow: {_list(perms.publish)}}}{responses}",
            f"      subscribe: {{allow: {_list(perms.subscribe)}}}",
            "    }}",
        ]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def render_server_conf(roster: Roster) -> str:
    """nats-server.conf, written once by ``init``; command-line flags (-a, -p, -sd) override its
    listen address and store, so the lab and the tests reuse it on their own ports."""
    validate(roster)
    d = roster.server_dir.rstrip("/")
    return "\n".join(
        [
            "# nats-server for Otherix networking, written by `otherix-bus init`. Users and",
            "# permissions are in authorization.conf (rewritten by otherix-bus add-node and",
            "# revoke-node, then reloaded); the rest here may be edited by hand.",
            "server_name: otherix-nats",
            f"listen: {_q(f'0.0.0.0:{roster.port}')}",
            "jetstream {",
            *([f"  store_dir: {_q(roster.store_dir)}"] if roster.store_dir else []),
            "  sync_interval: always  # an acknowledged intent write survives a power loss",
            "}",
            "tls {",
            f"  cert_file: {_q(d + '/server-cert.pem')}",
            f"  key_file: {_q(d + '/server-key.pem')}",
            "  timeout: 5  # seconds for the handshake; the default 0.5 is tight on a busy host",
            "  # TLS before anything else: an INFO in clear could be rewritten by a proxy to",
            "  # drop tls_required, and the client would then sign in in clear (found by review)",
            "  handshake_first: true",
            "}",
            'include "authorization.conf"',
            "",
        ]
    )
