"""``otherix-bus``: create a bus directory, add or revoke a node, reload the server.

Parses arguments and prints; the work is in ``client.bus.files``."""

import argparse
import sys
from pathlib import Path

import msgspec

from client.bus import files, permissions


def _reload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--reload-pid", type=int, metavar="PID", help="nats-server to reload after")
    g.add_argument("--pid-file", type=Path, help="file holding the pid of nats-server to reload")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otherix-bus", description="Identities, permissions and TLS of the Otherix bus."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="create DIR: CA, server certificate, seeds, configuration")
    p.add_argument("dir", type=Path)
    p.add_argument("--nodes", default="", help="comma-separated node names")
    p.add_argument("--host", action="append", default=[], help="server DNS name or IP (repeatable)")
    p.add_argument("--port", type=int, default=permissions.DEFAULT_PORT)
    p.add_argument("--bucket", default=permissions.DEFAULT_BUCKET, help="intent KV bucket")
    p.add_argument("--server-dir", help="DIR as nats-server sees it (default: DIR)")
    p.add_argument(
        "--store-dir",
        help="JetStream store as nats-server sees it (default: DIR/jetstream; '' = its -sd flag)",
    )
    p.add_argument(
        "--server",
        action="append",
        default=[],
        type=_server,
        metavar="NAME=HOST[:PORT[:ROUTE_PORT]]",
        help="a server of a cluster (give three or more): one configuration each, routes"
        " secured by mutual TLS and a route password; the certificate names every HOST",
    )
    p.add_argument("--cluster", default=permissions.DEFAULT_CLUSTER, help="the cluster's name")
    p.add_argument("--bind", default="0.0.0.0", help="address a cluster's servers listen on")
    p.add_argument(
        "--keep-existing",
        action="store_true",
        help="succeed without change when DIR already holds a bus (a container's first start)",
    )
    for name, help_ in [
        ("add-node", "give a node an identity"),
        ("revoke-node", "remove a node's identity"),
    ]:
        p = sub.add_parser(name, help=help_)
        p.add_argument("dir", type=Path)
        p.add_argument("node")
        _reload_args(p)
    p = sub.add_parser("renew-cert", help="new server certificate (same CA), e.g. for new hosts")
    p.add_argument("dir", type=Path)
    p.add_argument("--host", action="append", help="replaces the roster's hosts (repeatable)")
    _reload_args(p)
    p = sub.add_parser("render", help="rewrite authorization.conf from roster.json")
    p.add_argument("dir", type=Path)
    _reload_args(p)
    p = sub.add_parser("show", help="identities and their permissions")
    p.add_argument("dir", type=Path)
    p.add_argument("--json", action="store_true")
    return parser


def _server(value: str) -> permissions.ClusterServer:
    """``NAME=HOST[:PORT[:ROUTE_PORT]]`` (an IPv6 HOST in brackets)."""
    name, sep, rest = value.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME=HOST[:PORT[:ROUTE_PORT]]")
    if rest.startswith("["):
        host, _, ports = rest[1:].partition("]")
        ports = ports.removeprefix(":")
    else:
        host, _, ports = rest.partition(":")
    numbers = ports.split(":") if ports else []
    if len(numbers) > 2 or not all(n.isdigit() for n in numbers):
        raise argparse.ArgumentTypeError(f"{value!r}: ports must be numbers")
    defaults = [permissions.DEFAULT_PORT, permissions.DEFAULT_ROUTE_PORT]
    port, route_port = [int(n) for n in numbers] + defaults[len(numbers) :]
    return permissions.ClusterServer(name=name, host=host, port=port, route_port=route_port)


def _reload_target(args: argparse.Namespace) -> int | None:
    """The pid to reload, checked before anything changes so a typo refuses the whole command."""
    pid = args.reload_pid
    if args.pid_file is not None:
        pid = files.read_pid_file(args.pid_file)
    if pid is not None:
        files.check_process(pid)
    return pid


def _reload(pid: int | None) -> None:
    if pid is not None:
        files.reload_server(pid)
        print(f"reloaded nats-server (pid {pid})")


def _show(directory: Path, as_json: bool) -> None:
    roster = files.load_roster(directory)
    rows = [
        {"identity": label, "public_key": key, **msgspec.structs.asdict(perms)}
        for label, key, perms in permissions.identities(roster)
    ]
    if as_json:
        print(msgspec.json.encode(rows).decode())
        return
    for row in rows:
        print(f"{row['identity']}  {row['public_key']}")
        print(f"  publish:   {' '.join(row['publish'])}")
        if row["allow_responses"]:
            print("             + replies to requests it received (allow_responses)")
        print(f"  subscribe: {' '.join(row['subscribe'])}")


def run(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    match args.command:
        case "init":
            if args.keep_existing and (args.dir / files.ROSTER).exists():
                print(f"{args.dir} already holds a bus; left as it is")
                return
            nodes = tuple(n.strip() for n in args.nodes.split(",") if n.strip())
            files.init(
                args.dir,
                nodes=nodes,
                hosts=tuple(args.host),
                port=args.port,
                bucket=args.bucket,
                server_dir=args.server_dir,
                store_dir=args.store_dir,
                servers=tuple(args.server),
                cluster=args.cluster,
                bind=args.bind,
            )
            if not args.server:
                print(f"created {args.dir}: nats-server -c {args.dir / files.SERVER_CONF}")
                return
            print(f"created {args.dir} for cluster {args.cluster}; on each server NAME:")
            print(f"  nats-server -c {files.server_conf_file(args.dir, 'NAME')}")
            urls = ",".join(s.url for s in args.server)
            print(f"clients: OTHERIX_NATS_URL={urls}")
        case "add-node":
            pid = _reload_target(args)
            seed = files.add_node(args.dir, args.node)
            print(f"node {args.node}: credentials in {seed}")
            _reload(pid)
        case "revoke-node":
            pid = _reload_target(args)
            files.revoke_node(args.dir, args.node)
            print(f"node {args.node}: revoked")
            _reload(pid)
        case "renew-cert":
            pid = _reload_target(args)
            hosts = None if args.host is None else tuple(args.host)
            roster = files.renew_server_cert(args.dir, hosts)
            print(f"new server certificate for localhost, 127.0.0.1 {' '.join(roster.hosts)}")
            _reload(pid)
        case "render":
            pid = _reload_target(args)
            files.render(args.dir)
            _reload(pid)
        case "show":
            _show(args.dir, args.json)


def main(argv: list[str] | None = None) -> None:
    try:
        run(argv)
    except files.BusError as e:
        print(f"otherix-bus: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
