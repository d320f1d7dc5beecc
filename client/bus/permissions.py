"""The bus's roster and permission matrix, and the nats-server configuration text they render to.

Pure: a ``Roster`` (who exists, with which public nkey) goes in, configuration text comes out.
Nothing here reads files, generates keys or talks to a server (``client.bus.files`` does), so the
whole matrix is unit-testable as text and regeneration after add/revoke is deterministic.

A roster may name a cluster of servers (``ClusterServer``, three or more): each gets its own
configuration (``render_cluster_conf``) whose ``cluster {}`` block routes to the others. Routes
are mutual TLS with the server certificate (signed by the bus CA, which signs nothing a client
holds: clients prove who they are with nkeys) and carry a per-cluster route password as well, so
a server joins only with both the certificate and the configuration the cluster was made with.

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
DEFAULT_ROUTE_PORT = 6222
DEFAULT_CLUSTER = "otherix"
ROUTE_USER = "route"
MIN_CLUSTER = 3  # R3 intent: a majority (2) survives the loss of any one server

_BUCKET = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SERVER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ClusterServer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One server of a cluster, as clients and the other servers reach it."""

    name: str  # its server_name (unique in the cluster; JetStream places replicas by it)
    host: str  # DNS name or IP, in the server certificate
    port: int = DEFAULT_PORT  # clients
    route_port: int = DEFAULT_ROUTE_PORT  # the other servers

    @property
    def url(self) -> str:
        return f"nats://{_url_host(self.host)}:{self.port}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host  # an IPv6 address


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
    cluster: str = DEFAULT_CLUSTER  # the cluster's name (routes refuse another)
    servers: tuple[ClusterServer, ...] = ()  # empty: one server (nats-server.conf)
    bind: str = "0.0.0.0"  # the address a cluster's servers listen on (clients and routes)

    def server(self, name: str) -> ClusterServer:
        for s in self.servers:
            if s.name == name:
                return s
        raise ValueError(f"no server {name!r} in this bus's cluster")

    def urls(self) -> tuple[str, ...]:
        """Every server's client URL (what each client is given), or () for one server."""
        return tuple(s.url for s in self.servers)


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
    if roster.servers:
        if len(roster.servers) < MIN_CLUSTER:
            raise ValueError(f"a cluster needs at least {MIN_CLUSTER} servers")
        if not _SERVER_NAME.match(roster.cluster):
            raise ValueError(f"cluster name {roster.cluster!r} is not 1-63 of A-Z a-z 0-9 _ . -")
        for s in roster.servers:
            if not _SERVER_NAME.match(s.name):
                raise ValueError(f"server name {s.name!r} is not 1-63 of A-Z a-z 0-9 _ . -")
            if not all(1 <= p <= 65535 for p in (s.port, s.route_port)):
                raise ValueError(f"server {s.name}: ports must be 1-65535")
        names = [s.name for s in roster.servers]
        if len(set(names)) != len(names):
            raise ValueError("two servers share one name")
        ends = [(s.host, p) for s in roster.servers for p in (s.port, s.route_port)]
        if len(set(ends)) != len(ends):
            raise ValueError("two servers (or a server's client and route port) share an address")
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


def _jetstream(store_dir: str) -> list[str]:
    return [
        "jetstream {",
        *([f"  store_dir: {_q(store_dir)}"] if store_dir else []),
        "  # an acknowledged intent write survives a power loss; in a cluster it is acknowledged",
        "  # once a majority of the stream's replicas stored it",
        "  sync_interval: always",
        "}",
    ]


def _client_tls(d: str) -> list[str]:
    return [
        "tls {",
        f"  cert_file: {_q(d + '/server-cert.pem')}",
        f"  key_file: {_q(d + '/server-key.pem')}",
        "  timeout: 5  # seconds for the handshake; the default 0.5 is tight on a busy host",
        "  # TLS before anything else: an INFO in clear could be rewritten by a proxy to",
        "  # drop tls_required, and the client would then sign in in clear (found by review)",
        "  handshake_first: true",
        "}",
    ]


def render_cluster_conf(roster: Roster, name: str, route_secret: str) -> str:
    """nats-server-<name>.conf for server ``name`` of the roster's cluster. Its routes are mutual
    TLS (nats-server always verifies route certificates, both ways, here against the bus CA) and
    authenticated with ``route_secret``, which only the servers' configurations hold."""
    validate(roster)
    if not roster.servers:
        raise ValueError("this bus has no cluster of servers")
    me = roster.server(name)
    d = roster.server_dir.rstrip("/")
    store = f"{roster.store_dir.rstrip('/')}/{name}" if roster.store_dir else ""
    routes = [
        f"nats-route://{ROUTE_USER}:{route_secret}@{_url_host(s.host)}:{s.route_port}"
        for s in roster.servers
        if s.name != name
    ]
    return "\n".join(
        [
            f"# nats-server {name} of cluster {roster.cluster} (Otherix networking), written by",
            "# `otherix-bus init`. Users and permissions are in authorization.conf (rewritten by",
            "# otherix-bus add-node and revoke-node, then reloaded on every server). This file",
            "# holds the cluster's route password: it belongs to the servers only.",
            f"server_name: {_q(name)}",
            f"listen: {_q(f'{roster.bind}:{me.port}')}",
            *_jetstream(store),
            *_client_tls(d),
            "cluster {",
            f"  name: {_q(roster.cluster)}",
            f"  listen: {_q(f'{roster.bind}:{me.route_port}')}",
            "  # clients are given every server's URL; advertised addresses may be unreachable",
            "  # from them or missing from the certificate",
            "  no_advertise: true",
            "  tls {  # mutual: nats-server verifies route certificates in both directions",
            f"    cert_file: {_q(d + '/server-cert.pem')}",
            f"    key_file: {_q(d + '/server-key.pem')}",
            f"    ca_file: {_q(d + '/ca.pem')}",
            "    timeout: 5",
            "  }",
            f"  authorization {{ user: {_q(ROUTE_USER)}, password: {_q(route_secret)}, timeout: 5 }}",
            f"  routes: {_list(tuple(routes))}",
            "}",
            'include "authorization.conf"',
            "",
        ]
    )


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
            *_jetstream(roster.store_dir),
            *_client_tls(d),
            'include "authorization.conf"',
            "",
        ]
    )
