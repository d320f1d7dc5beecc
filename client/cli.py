"""``otherixctl``: the operator CLI. Talks to the controller API over NATS; prints tables or JSON.

Errors print the controller's message and exit 1 (2 for bad flags, 3 when ``status --wait`` times
out before every node converged, 4 when a write timed out: its outcome is unknown, and the CLI
says how to check and that repeating the command is safe). It never reads the store or computes
state itself: everything it shows comes from the API (and, for ``watch``, the acks and health
agents publish). Listings print every item: the client follows the controller's pages.
"""

import argparse
import asyncio
import shlex
import sys
import time
from collections.abc import Sequence

import msgspec
import nats

from client.api import ApiClient, ApiError
from schemas import api, naming
from schemas.bus import BusConfigError
from schemas.codec import decode
from schemas.errors import Timeout
from schemas.intent import Egress, NetworkType
from schemas.messages import Ack, Health
from schemas.options import add_bus, connect_kwargs, quiet_tls_close

EXIT_ERROR, EXIT_USAGE, EXIT_TIMEOUT, EXIT_UNKNOWN = 1, 2, 3, 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otherixctl", description="Operate Otherix networking.")
    add_bus(p)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the controller")
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print JSON instead of a table")
    top = p.add_subparsers(dest="cmd", required=True)

    net = top.add_parser("network", help="bridge and overlay networks").add_subparsers(
        dest="sub", required=True
    )
    c = net.add_parser("create", parents=[json_flag])
    c.add_argument("name")
    c.add_argument("--type", required=True, choices=[t.value for t in NetworkType])
    c.add_argument("--subnet", required=True, help="IPv4 CIDR; its first host is the gateway")
    c.add_argument("--egress", choices=[e.value for e in Egress], default="none")
    c.add_argument("--vni", type=int, help="overlay only; allocated from 1000 up when omitted")
    net.add_parser("list", parents=[json_flag])
    s = net.add_parser("show", parents=[json_flag])
    s.add_argument("name")
    d = net.add_parser("delete", parents=[json_flag])
    d.add_argument("name")
    d.add_argument("--force", action="store_true", help="also detach the network's NICs")

    nic = top.add_parser("nic", help="VM NICs").add_subparsers(dest="sub", required=True)
    a = nic.add_parser("attach", parents=[json_flag])
    a.add_argument("--network", required=True)
    a.add_argument("--node", required=True)
    a.add_argument("--vm", required=True)
    a.add_argument("--mac")
    a.add_argument("--ip")
    a.add_argument(
        "--no-port-security",
        dest="port_security",
        action="store_false",
        help="let the VM send as any MAC or address (appliances such as routers only)",
    )
    dt = nic.add_parser("detach", parents=[json_flag])
    dt.add_argument("id", help="NIC id, a 12+ digit prefix of it, or its tap name")
    ls = nic.add_parser("list", parents=[json_flag])
    ls.add_argument("--network")
    ls.add_argument("--node")

    node = top.add_parser("node", help="hypervisor nodes").add_subparsers(dest="sub", required=True)
    node.add_parser("list", parents=[json_flag])
    rm = node.add_parser("remove", parents=[json_flag])
    rm.add_argument("name")
    rm.add_argument("--force", action="store_true", help="also detach the node's NICs")
    rk = node.add_parser(
        "rekey", parents=[json_flag], help="let the node's next registration change its key"
    )
    rk.add_argument("name")

    st = top.add_parser("status", parents=[json_flag], help="desired vs applied version per node")
    st.add_argument(
        "--wait", type=float, metavar="SECONDS", help="wait until every node has converged"
    )

    w = top.add_parser("watch", parents=[json_flag], help="live acks and health")
    w.add_argument("--count", type=int, help="stop after this many messages")
    w.add_argument("--seconds", type=float, help="stop after this long")
    return p


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def ago(ts: float, now: float) -> str:
    return "never" if not ts else f"{max(0.0, now - ts):.1f}s ago"


def show_networks(infos: list[api.NetworkInfo]) -> str:
    rows = [
        (
            i.network.name,
            i.network.type.value,
            i.network.subnet,
            i.network.gateway,
            i.network.egress.value,
            i.network.vni,
            i.mtu,
            i.bridge,
            i.nics,
        )
        for i in infos
    ]
    return table(
        rows, ("NAME", "TYPE", "SUBNET", "GATEWAY", "EGRESS", "VNI", "MTU", "BRIDGE", "NICS")
    )


def show_nics(infos: list[api.NicInfo]) -> str:
    rows = [
        (i.nic.id, i.tap, i.nic.network, i.nic.node, i.nic.vm, i.nic.mac, i.nic.ip, i.state.value)
        for i in infos
    ]
    return table(rows, ("ID", "TAP", "NETWORK", "NODE", "VM", "MAC", "IP", "STATE"))


def show_nodes(nodes: list[api.NodeStatus], now: float) -> str:
    rows, lines = [], []
    for s in nodes:
        key = s.node.wg_public_key
        rows.append(
            (s.node.name, s.node.underlay_ip, s.node.tunnel_ip, key, ago(s.last_heard, now))
        )
        for peer in s.health.peers if s.health else ():
            handshake = ago(peer.latest_handshake, now)
            lines.append(
                f"  {s.node.name} -> {peer.node or peer.public_key}  endpoint {peer.endpoint}  handshake {handshake}"
            )
    out = table(rows, ("NODE", "UNDERLAY", "TUNNEL", "PUBLIC KEY", "HEARD"))
    return out + ("\nWireGuard peers:\n" + "\n".join(lines) if lines else "")


def show_status(status: api.Status) -> str:
    rows = []
    for s in status.nodes:
        health = "-" if s.health is None else ("ok" if s.health.ok else "degraded")
        state = "stale" if s.stale else ("converged" if s.converged else "pending")
        rows.append(
            (
                s.node.name,
                s.desired_version,
                s.applied_version,
                state,
                health,
                ago(s.last_heard, status.now),
                len(s.no_carrier),
                s.last_error,
            )
        )
    summary = (
        f"{len(status.nodes)} node(s), {status.networks} network(s), {status.nics} NIC(s); "
        + ("all converged" if status.converged else "not converged")
    )
    summary += f"\nleading controller: {status.leader or 'none'}"
    if status.refused_reports:
        refused = ", ".join(f"{n} {why}" for why, n in sorted(status.refused_reports.items()))
        summary += f"\nagent reports refused: {refused}"
    header = ("NODE", "DESIRED", "APPLIED", "STATE", "HEALTH", "HEARD", "NO CARRIER", "LAST ERROR")
    return table(rows, header) + "\n" + summary


def emit(args: argparse.Namespace, value: object, text: str) -> None:
    if args.json:
        sys.stdout.write(msgspec.json.encode(value).decode() + "\n")
    else:
        print(text)


async def _quiet(_: Exception) -> None:
    """nats-py's default error callback prints a traceback per attempt; we print one line."""


async def run(args: argparse.Namespace) -> int:
    try:
        nc = await nats.connect(
            args.nats,
            **connect_kwargs(args, "otherixctl"),
            connect_timeout=args.timeout,
            max_reconnect_attempts=1,
            allow_reconnect=False,
            error_cb=_quiet,
        )
    except BusConfigError as e:
        print(f"otherixctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        print(f"otherixctl: cannot reach NATS at {args.nats}: {e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        return await dispatch(args, nc, ApiClient(nc, timeout=args.timeout))
    except Timeout as e:
        if (check := check_command(args)) is None:  # a read: nothing was changed
            print(f"otherixctl: error {e.code}: {e.message}", file=sys.stderr)
            return EXIT_ERROR
        print(unknown_outcome(e, check, getattr(args, "argv", None)), file=sys.stderr)
        return EXIT_UNKNOWN
    except ApiError as e:
        print(f"otherixctl: error {e.code}: {e.message}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        await nc.close()


def check_command(args: argparse.Namespace) -> str | None:
    """For a write, the command that shows whether it was made; None for a read."""
    match args.cmd, getattr(args, "sub", None):
        case "network", "create" | "delete":
            return f"otherixctl network show {shlex.quote(args.name)}"
        case "nic", "attach":
            return shlex.join(
                ["otherixctl", "nic", "list", "--network", args.network, "--node", args.node]
            )
        case "nic", "detach":
            return "otherixctl nic list"
        case "node", "remove" | "rekey":
            return "otherixctl node list"
    return None


def unknown_outcome(error: Timeout, check: str, argv: list[str] | None) -> str:
    again = shlex.join(["otherixctl", *argv]) if argv else "the same command"
    return (
        f"otherixctl: {error.message}: the change may or may not have been made.\n"
        f"  check:  {check}\n"
        f"  retry:  {again}\n"
        "  (repeating it is safe: a create or attach that was made returns what it made,"
        " marked as existing; a delete or detach that was made answers that it is gone)"
    )


async def dispatch(args: argparse.Namespace, nc, client: ApiClient) -> int:
    match args.cmd, getattr(args, "sub", None):
        case "network", "create":
            info = await client.network_create(
                args.name, args.type, args.subnet, args.egress, args.vni
            )
            emit(args, info, show_networks([info]))
            if info.existed:
                print(f"otherixctl: network {info.network.name} existed already", file=sys.stderr)
        case "network", "list":
            infos = await client.network_list()
            emit(args, infos, show_networks(infos))
        case "network", "show":
            info = await client.network_show(args.name)
            nics = await client.nic_list(network=args.name)
            emit(
                args,
                {"network": info, "nics": nics},
                show_networks([info]) + "\n\n" + show_nics(nics),
            )
        case "network", "delete":
            info = await client.network_delete(args.name, args.force)
            emit(args, info, f"deleted network {info.network.name}")
        case "nic", "attach":
            info = await client.nic_attach(
                args.network, args.node, args.vm, args.mac, args.ip, args.port_security
            )
            emit(args, info, show_nics([info]))
            if info.existed:
                print(
                    f"otherixctl: vm {info.nic.vm} had this NIC on {info.nic.network} already",
                    file=sys.stderr,
                )
        case "nic", "detach":
            info = await client.nic_detach(args.id)
            emit(args, info, f"detached NIC {info.nic.id} (tap {info.tap})")
        case "nic", "list":
            infos = await client.nic_list(args.network, args.node)
            emit(args, infos, show_nics(infos))
        case "node", "list":
            nodes = await client.node_list()
            emit(args, nodes, show_nodes(nodes, time.time()))
        case "node", "remove":
            removed = await client.node_remove(args.name, args.force)
            emit(args, removed, f"removed node {removed.node.name}")
        case "node", "rekey":
            st = await client.node_rekey(args.name)
            emit(args, st, f"node {st.node.name} may now register a new key or endpoint once")
        case "status", _:
            return await status(args, client)
        case "watch", _:
            await watch(args, nc)
    return 0


async def status(args: argparse.Namespace, client: ApiClient) -> int:
    deadline = time.monotonic() + (args.wait or 0)
    while True:
        st = await client.status()
        if not args.wait or (st.converged and st.nodes) or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.2)
    emit(args, st, show_status(st))
    if args.wait and not (st.converged and st.nodes):
        print(f"otherixctl: not converged after {args.wait}s", file=sys.stderr)
        return EXIT_TIMEOUT
    return 0


async def watch(args: argparse.Namespace, nc) -> None:
    done = asyncio.Event()
    seen = 0

    async def on_msg(msg) -> None:
        nonlocal seen
        kind = msg.subject.split(".")[2]
        try:
            value = decode(msg.data, Ack if kind == "ack" else Health)
        except msgspec.DecodeError as e:
            print(f"{msg.subject}: malformed: {e}", file=sys.stderr)
            return
        if args.json:
            print(msgspec.json.encode({"subject": msg.subject, kind: value}).decode(), flush=True)
        elif isinstance(value, Ack):
            result = "ok" if value.ok else f"ERROR {value.error}"
            print(
                f"ack     {value.node:<12} version {value.version:<6} applied {value.applied_version:<6} changes {value.changes:<4} {value.duration_ms:8.1f} ms  {result}",
                flush=True,
            )
        else:
            print(
                f"health  {value.node:<12} applied {value.applied_version:<6} {'ok' if value.ok else 'degraded'}  rx {value.snapshots_received} rejected {value.snapshots_rejected} peers {len(value.peers)}",
                flush=True,
            )
        seen += 1
        if args.count and seen >= args.count:
            done.set()

    await nc.subscribe(naming.ack_subject("*"), cb=on_msg)
    await nc.subscribe(naming.health_subject("*"), cb=on_msg)
    try:
        await asyncio.wait_for(done.wait(), args.seconds)
    except TimeoutError:
        pass


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # repeated verbatim when a write's outcome is unknown
    quiet_tls_close()
    try:
        sys.exit(asyncio.run(run(args)))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
