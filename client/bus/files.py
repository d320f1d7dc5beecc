"""The bus directory: creates it, adds and revokes nodes, renews the server certificate, and
asks nats-server to reload (SIGHUP: no restart, removed users are disconnected).

Layout of DIR (0700, every file 0600)::

    roster.json          who exists (client.bus.permissions.Roster), the source of truth
    nats-server.conf     listen, JetStream, TLS; includes authorization.conf (written by init)
    nats-server-<name>.conf   instead, one per server of a cluster (``init --server``): also
                         the cluster block, with the route password (servers only)
    authorization.conf   users and permissions, re-rendered from the roster on every change
    ca.pem, ca-key.pem   the CA clients trust (keep ca-key.pem offline in production)
    server-cert.pem, server-key.pem
    controller.nk, admin.nk, viewer.nk, node-<name>.nk   one nkey seed per identity
    .lock                serialises concurrent otherix-bus commands

Every write goes to a temporary file that is renamed into place, under a lock on DIR, and every
input is validated before the first write: a refused command leaves DIR as it was. ``init``
builds the whole directory beside DIR and renames it in one step.
"""

import contextlib
import fcntl
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec

from client.bus import permissions, pki
from client.bus.permissions import Roster
from schemas import naming
from schemas.bus import CA_ENV, CREDS_ENV, connect_kwargs

ROSTER = "roster.json"
SERVER_CONF = "nats-server.conf"
AUTHORIZATION_CONF = "authorization.conf"
CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
ROLES = ("controller", "admin", "viewer")
_LOCK = ".lock"


class BusError(Exception):
    """A bus directory command was refused; nothing was changed."""


def server_conf_file(directory: Path, server: str) -> Path:
    """The configuration of server ``server`` of the bus's cluster."""
    return Path(directory) / f"nats-server-{server}.conf"


def _sans(roster: Roster, hosts: tuple[str, ...]) -> tuple[str, ...]:
    """What the server certificate names: ``hosts`` and every cluster server's address (one
    certificate serves each server's clients and routes)."""
    return tuple(dict.fromkeys((*hosts, *(s.host for s in roster.servers))))


def role_seed_file(directory: Path, role: str) -> Path:
    if role not in ROLES:
        raise BusError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    return Path(directory) / f"{role}.nk"


def node_seed_file(directory: Path, node: str) -> Path:
    return Path(directory) / f"node-{node}.nk"


def seed_file(directory: Path, identity: str) -> Path:
    """The seed of ``identity``: a role (controller, admin, viewer) or a node name."""
    if identity in ROLES:
        return role_seed_file(directory, identity)
    return node_seed_file(directory, identity)


def identity_env(directory: Path, identity: str) -> dict[str, str]:
    """The variables a command reads to join the bus as ``identity`` (credentials and CA)."""
    return {CREDS_ENV: str(seed_file(directory, identity)), CA_ENV: str(Path(directory) / CA_CERT)}


def identity_kwargs(directory: Path, identity: str, name: str | None = None) -> dict:
    """``nats.connect`` keywords for ``identity`` of this bus directory."""
    return connect_kwargs(seed_file(directory, identity), Path(directory) / CA_CERT, name=name)


def _write(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, mode 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp creates it 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_roster(directory: Path) -> Roster:
    path = Path(directory) / ROSTER
    try:
        roster = msgspec.json.decode(path.read_bytes(), type=Roster)
    except FileNotFoundError:
        raise BusError(f"{directory} is not a bus directory (no {ROSTER}); run init") from None
    except msgspec.DecodeError as e:  # ValidationError is a DecodeError
        raise BusError(f"{path}: {e}") from None
    try:
        permissions.validate(roster)
    except ValueError as e:
        raise BusError(f"{path}: {e}") from None
    return roster


def _save(directory: Path, roster: Roster) -> None:
    """Roster first, then the configuration rendered from it: after a crash in between, the next
    command re-renders from the roster."""
    text = permissions.render_authorization(roster)  # validates before any write
    _write(directory / ROSTER, msgspec.json.format(msgspec.json.encode(roster)) + b"\n")
    _write(directory / AUTHORIZATION_CONF, text.encode())


def _check_node(name: str) -> None:
    if not naming.valid_id(name):
        raise BusError(
            f"node name {name!r} is not a lowercase DNS label (a-z, 0-9, '-', at most 63)"
        )


def init(
    directory: Path,
    nodes: tuple[str, ...] = (),
    hosts: tuple[str, ...] = (),
    port: int = permissions.DEFAULT_PORT,
    bucket: str = permissions.DEFAULT_BUCKET,
    server_dir: str | None = None,
    store_dir: str | None = None,
    servers: tuple[permissions.ClusterServer, ...] = (),
    cluster: str = permissions.DEFAULT_CLUSTER,
    bind: str = "0.0.0.0",
) -> Roster:
    """Create DIR with a CA, a server certificate, one seed per role and node, the roster and
    the server configuration. DIR must not exist or be empty. ``store_dir=""`` leaves the
    JetStream store to nats-server's ``-sd`` flag (which a configured store_dir forbids).
    With ``servers`` (three or more), one configuration per server of a cluster, each with its
    own store under store_dir, routes secured by mutual TLS and a route password."""
    directory = Path(directory).absolute()
    for node in nodes:
        _check_node(node)
    if len(set(nodes)) != len(nodes):
        raise BusError("a node is named twice")
    bad = [h for h in (*hosts, *(s.host for s in servers), bind) if not pki.valid_host(h)]
    if bad:
        raise BusError(f"not a DNS name or IP address: {', '.join(bad)}")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise BusError(f"{directory} exists and is not an empty directory")
    server_dir = server_dir or str(directory)
    seeds = {role: pki.new_user_seed() for role in ROLES}
    node_seeds = {node: pki.new_user_seed() for node in nodes}
    roster = Roster(
        bucket=bucket,
        port=port,
        hosts=tuple(hosts),
        server_dir=server_dir,
        store_dir=server_dir.rstrip("/") + "/jetstream" if store_dir is None else store_dir,
        nodes={node: pki.public_key(seed) for node, seed in node_seeds.items()},
        cluster=cluster,
        servers=tuple(servers),
        bind=bind,
        **{role: pki.public_key(seed) for role, seed in seeds.items()},
    )
    try:
        if roster.servers:
            secret = pki.new_route_secret()
            confs = {
                server_conf_file(Path(), s.name).name: permissions.render_cluster_conf(
                    roster, s.name, secret
                )
                for s in roster.servers
            }
        else:
            confs = {SERVER_CONF: permissions.render_server_conf(roster)}
    except ValueError as e:
        raise BusError(str(e)) from None
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))  # 0700
    try:
        ca_cert, ca_key = pki.new_ca()
        server_cert, server_key = pki.new_server_cert(ca_cert, ca_key, _sans(roster, roster.hosts))
        for name, data in [
            (CA_CERT, ca_cert),
            (CA_KEY, ca_key),
            (SERVER_CERT, server_cert),
            (SERVER_KEY, server_key),
            *((conf, text.encode()) for conf, text in confs.items()),
        ]:
            _write(staging / name, data)
        for role, seed in seeds.items():
            _write(role_seed_file(staging, role), seed + b"\n")
        for node, seed in node_seeds.items():
            _write(node_seed_file(staging, node), seed + b"\n")
        _save(staging, roster)
        if directory.exists():
            directory.rmdir()  # empty, checked above
        os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return roster


def add_node(directory: Path, node: str) -> Path:
    """Give ``node`` an identity; returns its seed file. Reload the server to let it in."""
    directory = Path(directory)
    _check_node(node)
    with _locked(directory):
        roster = load_roster(directory)
        if node in roster.nodes:
            raise BusError(f"node {node} already has an identity; revoke it first to re-key")
        seed = pki.new_user_seed()
        seed_file = node_seed_file(directory, node)
        _write(seed_file, seed + b"\n")
        _save(
            directory,
            msgspec.structs.replace(roster, nodes={**roster.nodes, node: pki.public_key(seed)}),
        )
    return seed_file


def revoke_node(directory: Path, node: str) -> None:
    """Remove ``node``'s identity. Reload the server to refuse it and cut its connections."""
    directory = Path(directory)
    _check_node(node)
    with _locked(directory):
        roster = load_roster(directory)
        if node not in roster.nodes:
            raise BusError(f"node {node} has no identity in {directory}")
        nodes = {n: k for n, k in roster.nodes.items() if n != node}
        _save(directory, msgspec.structs.replace(roster, nodes=nodes))
        node_seed_file(directory, node).unlink(missing_ok=True)


def renew_server_cert(directory: Path, hosts: tuple[str, ...] | None = None) -> Roster:
    """A new server certificate from the same CA, for ``hosts`` (default: the roster's) besides
    localhost, 127.0.0.1 and every cluster server; clients and the other servers keep trusting it. Reload the server to use it. If this is
    interrupted between the key and the certificate, run it again."""
    directory = Path(directory)
    with _locked(directory):
        roster = load_roster(directory)
        hosts = roster.hosts if hosts is None else tuple(hosts)
        bad = [h for h in hosts if not pki.valid_host(h)]
        if bad:
            raise BusError(f"not a DNS name or IP address: {', '.join(bad)}")
        try:
            ca_cert, ca_key = (directory / CA_CERT).read_bytes(), (directory / CA_KEY).read_bytes()
        except OSError as e:
            raise BusError(f"the CA is needed to sign a server certificate: {e}") from None
        cert, key = pki.new_server_cert(ca_cert, ca_key, _sans(roster, hosts))
        roster = msgspec.structs.replace(roster, hosts=hosts)
        _write(directory / SERVER_KEY, key)
        _write(directory / SERVER_CERT, cert)
        _save(directory, roster)
    return roster


def render(directory: Path) -> None:
    """Rewrite authorization.conf from the roster (after a crash, or a hand-edited roster)."""
    directory = Path(directory)
    with _locked(directory):
        _save(directory, load_roster(directory))


def reload_server(pid: int) -> None:
    """Ask nats-server to re-read its configuration (what ``nats-server --signal reload`` does):
    new users are let in, removed users are refused and disconnected, without a restart."""
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise BusError(f"no process {pid} to reload") from None


def check_process(pid: int) -> None:
    """Refuse a pid that names no process we may signal (before changing anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise BusError(f"no process {pid} to reload") from None
    except PermissionError:
        raise BusError(f"not allowed to signal process {pid}") from None


def read_pid_file(path: Path) -> int:
    try:
        text = Path(path).read_text().strip()
    except OSError as e:
        raise BusError(f"cannot read pid file: {e}") from None
    if not text.isdigit():
        raise BusError(f"{path} does not hold a process id")
    return int(text)
