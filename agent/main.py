"""``otherix-agent``: the node agent. Runs in the node's network namespace, as root."""

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import nats
import uvloop

from agent.announce import Announcer
from agent.kernel_events import KernelEvents
from agent.links.applier import LinkApplier
from agent.links.netlink import NetlinkLinks
from agent.metrics import PEER_SERIES, AgentMetrics, CountingBus, CountingLinks
from agent.netlink_thread import NetlinkThread
from agent.nft.applier import NftApplier
from agent.runner import Agent, AgentConfig
from agent.state import secure_state_dir
from agent.wireguard.applier import WireGuardApplier
from agent.wireguard.keys import InvalidKey, load_or_create_private_key
from schemas import naming
from schemas.bus import BusConfigError, Reconnect, connect_patiently
from schemas.options import add_common, add_metrics, connect_kwargs, env, option, setup_logging
from schemas.probes import ProbeServer

log = logging.getLogger("agent")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="otherix-agent", description=__doc__)
    add_common(p)
    option(
        p,
        "--node",
        "OTHERIX_NODE",
        socket.gethostname().split(".")[0].lower(),
        "node name (default: short host name)",
    )
    option(
        p,
        "--state-dir",
        "OTHERIX_STATE_DIR",
        "/var/lib/otherix-agent",
        "keys and applied version",
        type=Path,
    )
    option(
        p,
        "--underlay-ip",
        "OTHERIX_UNDERLAY_IP",
        None,
        "this node's address other nodes reach it on; required for the overlay mesh",
    )
    option(
        p,
        "--wg-port",
        "OTHERIX_WG_PORT",
        str(naming.WIREGUARD_PORT),
        "WireGuard listen port",
        type=int,
    )
    option(
        p,
        "--wg-backend",
        "OTHERIX_WG_BACKEND",
        "auto",
        "kernel module or wireguard-go",
        choices=("auto", "kernel", "userspace"),
    )
    p.add_argument("--no-mesh", action="store_true", default=env("OTHERIX_NO_MESH") == "1",
                   help="do not join the WireGuard mesh, bridge networks only (env OTHERIX_NO_MESH=1)")  # fmt: skip
    p.add_argument("--rotate-key", action="store_true",
                   help="replace this node's WireGuard key at start; peers learn the new one on the next heartbeat")  # fmt: skip
    option(
        p,
        "--health-interval",
        "OTHERIX_HEALTH_INTERVAL",
        "5",
        "seconds between health reports",
        type=float,
    )
    add_metrics(p)  # off by default: compose turns it on
    option(
        p,
        "--metrics-peer-series",
        "OTHERIX_METRICS_PEER_SERIES",
        str(PEER_SERIES),
        "WireGuard handshake-age series at most, one per peer, the oldest handshakes first"
        " (a fleet-wide series count grows as nodes squared otherwise)",
        type=int,
    )
    args = p.parse_args(argv)
    if not naming.valid_id(args.node):
        p.error(f"--node {args.node!r}: use 1-63 lowercase letters, digits and '-'")
    if args.underlay_ip is not None:
        try:
            ipaddress.IPv4Address(args.underlay_ip)
        except ValueError:
            p.error(f"--underlay-ip {args.underlay_ip!r} is not an IPv4 address")
    if not 1 <= args.wg_port <= 65535:
        p.error(f"--wg-port {args.wg_port}: not a UDP port")
    if not 0.1 <= args.health_interval <= 3600:
        p.error(f"--health-interval {args.health_interval}: must be between 0.1 and 3600 seconds")
    if not 0 <= args.metrics_peer_series <= 100_000:
        p.error(f"--metrics-peer-series {args.metrics_peer_series}: must be between 0 and 100000")
    return args


def make_wireguard(args: argparse.Namespace, links: LinkApplier):
    if args.no_mesh or not args.underlay_ip:
        if not args.no_mesh:
            log.warning("agent %s: no --underlay-ip, so not joining the overlay mesh", args.node)
        return None
    private = load_or_create_private_key(args.state_dir, rotate=args.rotate_key)
    if args.rotate_key:
        log.warning("agent %s: WireGuard key rotated", args.node)
    return WireGuardApplier(links, private_key=private, backend=args.wg_backend, node=args.node)


async def run(args: argparse.Namespace) -> None:
    secure_state_dir(args.state_dir)  # it holds the node's private key
    netlink = NetlinkThread()  # the one rtnetlink socket: links, FDB and otwg0's link
    netlink.start()
    # counted always (it costs next to nothing), served on request
    metrics = AgentMetrics(args.metrics_peer_series)
    try:
        probes = await serve_probes(args.metrics_address, metrics, netlink)
    except OSError as e:
        netlink.stop()
        host, port = args.metrics_address
        sys.exit(f"otherix-agent: cannot serve metrics on {host}:{port} (--metrics-address): {e}")
    try:
        await serve(args, netlink, metrics)
    finally:
        if probes is not None:
            await probes.stop()


async def serve_probes(
    address: tuple[str, int] | None, metrics: AgentMetrics, netlink: NetlinkThread
) -> ProbeServer | None:
    """/metrics, /healthz (the event loop answers and the netlink thread runs) and /readyz."""
    if address is None:
        return None
    probes = ProbeServer(
        metrics.registry,
        live=lambda: None if netlink.alive else "netlink thread not running",
        ready=metrics.ready,
        refresh=metrics.refresh,
    )
    await probes.start(*address)
    return probes


async def serve(args: argparse.Namespace, netlink: NetlinkThread, metrics: AgentMetrics) -> None:
    links = LinkApplier(CountingLinks(NetlinkLinks(netlink, node=args.node), metrics))
    try:
        wireguard = make_wireguard(args, links)
    except InvalidKey as e:
        netlink.stop()
        sys.exit(f"otherix-agent: {e}")
    kwargs = connect_kwargs(args, f"otherix-agent-{args.node}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # an agent started while nats-server is down keeps trying (back-off with jitter), and a
    # SIGTERM meanwhile ends it cleanly
    bus = Reconnect(f"agent {args.node}")
    connecting = asyncio.ensure_future(connect_patiently(args.nats, bus, **kwargs))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not connecting.done():
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        log.info("agent %s: stopped before reaching the bus; nothing changed", args.node)
        if wireguard is not None:
            await wireguard.close()
        netlink.stop()
        return
    stopping.cancel()
    nc = connecting.result()
    bus.connected_to(nc)  # and to which server: a lost one is not retried first
    config = AgentConfig(
        node=args.node,
        state_dir=args.state_dir,
        underlay_ip=args.underlay_ip,
        wg_listen_port=args.wg_port,
        health_interval=args.health_interval,
    )
    nft = NftApplier(node=args.node)
    events = KernelEvents.try_open()  # drift seen without reading the kernel every heartbeat
    agent = Agent(
        CountingBus(nc, args.node, metrics), config, links, nft, wireguard,
        Announcer(args.node, state_dir=config.state_dir), events,
    )  # fmt: skip
    metrics.watch(agent)
    await agent.start()
    await stop.wait()
    log.info("agent %s: stopping; the data plane stays as it is", args.node)
    await agent.stop()
    await agent.farewell(timeout=2.0)
    if wireguard is not None:
        await wireguard.close()  # wireguard-go keeps running: the mesh stays up
    with contextlib.suppress(Exception):  # bounded: a dead bus must not hold the exit
        await asyncio.wait_for(nc.drain(), 3.0)
    netlink.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_format, args.log_level)
    if os.geteuid() != 0:
        sys.exit("otherix-agent: must run as root (it programs netlink and nftables)")
    try:
        uvloop.run(run(args))
    except BusConfigError as e:
        sys.exit(f"otherix-agent: {e}")
    except (OSError, nats.errors.Error) as e:
        sys.exit(f"otherix-agent: cannot reach NATS at {','.join(args.nats)}: {e}")


if __name__ == "__main__":
    main()
