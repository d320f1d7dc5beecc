"""``otherix-controller``: connect to NATS, open the intent bucket, serve the API, heartbeat;
with ``--metrics-address``, serve Prometheus metrics, /healthz and /readyz from the start."""

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys

import nats
import uvloop

from controller.compute import ClusterConfig
from controller.metrics import ControllerMetrics
from controller.service import Controller
from controller.store import BUCKET, Store
from schemas import naming
from schemas.bus import BusConfigError, Reconnect, connect_patiently
from schemas.options import add_common, add_metrics, connect_kwargs, option, setup_logging
from schemas.probes import ProbeServer

log = logging.getLogger("controller")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="otherix-controller", description=__doc__)
    add_common(p)
    add_metrics(p)
    option(
        p,
        "--heartbeat",
        "OTHERIX_HEARTBEAT",
        "1.0",
        "seconds between snapshot publications",
        type=float,
    )
    option(p, "--underlay-mtu", "OTHERIX_UNDERLAY_MTU", "1500", "cluster underlay MTU", type=int)
    option(
        p,
        "--mesh-prefix",
        "OTHERIX_MESH_PREFIX",
        "100.64.0.0/16",
        "prefix node tunnel addresses come from",
    )
    option(
        p,
        "--underlay-cidr",
        "OTHERIX_UNDERLAY_CIDRS",
        "",
        "the nodes' own network(s), comma-separated: never a VM network, never reachable from VMs",
    )
    option(p, "--bucket", "OTHERIX_BUCKET", BUCKET, "JetStream KV bucket of the intent")
    option(
        p,
        "--replicas",
        "OTHERIX_REPLICAS",
        "1",
        "copies of the intent bucket when the controller creates it (3 on a 3-server cluster:"
        " a write is acknowledged once a majority stored it)",
        type=int,
    )
    option(
        p,
        "--instance",
        "OTHERIX_INSTANCE",
        "otherix-controller",
        "this controller's name: its NATS connection name and its lease holder name (unique)",
    )
    args = p.parse_args(argv)
    if not 1 <= args.replicas <= 5:
        p.error(f"--replicas {args.replicas}: JetStream keeps 1 to 5 copies")
    if not 0.05 <= args.heartbeat <= 3600:
        p.error(f"--heartbeat {args.heartbeat}: must be between 0.05 and 3600 seconds")
    if not naming.MIN_UNDERLAY_MTU <= args.underlay_mtu <= naming.MAX_UNDERLAY_MTU:
        p.error(
            f"--underlay-mtu {args.underlay_mtu}: must be between {naming.MIN_UNDERLAY_MTU} and {naming.MAX_UNDERLAY_MTU}"
        )
    try:
        mesh = ipaddress.IPv4Network(args.mesh_prefix)
    except ValueError as e:
        p.error(f"--mesh-prefix {args.mesh_prefix!r}: {e}")
    if mesh.prefixlen > 30:
        p.error(f"--mesh-prefix {args.mesh_prefix}: too small for a mesh (at most /30)")
    cidrs = [c.strip() for c in args.underlay_cidr.split(",") if c.strip()]
    try:
        args.underlay_cidrs = tuple(str(ipaddress.IPv4Network(c)) for c in cidrs)
    except ValueError as e:
        p.error(f"--underlay-cidr {args.underlay_cidr!r}: {e}")
    return args


async def open_store(nc, bucket: str, replicas: int = 1, attempts: int = 50) -> Store:
    """JetStream may still be starting (or recovering, or a cluster electing its meta leader)
    when we connect: retry for ~10 s."""
    for attempt in range(attempts):
        try:
            return await Store.open(nc.jetstream(), bucket, replicas=replicas)
        except (nats.errors.Error, TimeoutError) as e:
            if attempt == attempts - 1:
                raise SystemExit(f"otherix-controller: JetStream is not available: {e}") from None
            log.warning("controller: JetStream not ready (%s); retrying", e)
            await asyncio.sleep(0.2)
    raise AssertionError("unreachable")


class Probes:
    """The probe server's view of the process: before the controller exists, what it awaits."""

    def __init__(self, metrics: ControllerMetrics):
        self.controller: Controller | None = None
        self.waiting = "not connected to NATS"
        self.server = ProbeServer(metrics.registry, ready=self.ready, refresh=self.refresh)

    def ready(self) -> str | None:
        return self.controller.not_ready() if self.controller else self.waiting

    def refresh(self) -> None:
        if self.controller is not None:
            self.controller.refresh_metrics()

    async def start(self, host: str, port: int) -> None:
        try:
            await self.server.start(host, port)
        except OSError as e:  # in use, or not an address of this host
            raise SystemExit(
                f"otherix-controller: cannot serve metrics on {host}:{port}"
                f" (--metrics-address): {e.strerror or e}"
            ) from None


async def run(args: argparse.Namespace) -> None:
    metrics = ControllerMetrics()
    probes = Probes(metrics)
    if args.metrics_address:  # first: /readyz says why not while we connect and load
        await probes.start(*args.metrics_address)
    try:
        await serve(args, metrics, probes)
    finally:
        await probes.server.stop()


async def serve(args: argparse.Namespace, metrics: ControllerMetrics, probes: Probes) -> None:
    bus = Reconnect("controller")
    nc = await connect_patiently(args.nats, bus, **connect_kwargs(args, args.instance))
    bus.connected_to(nc)
    probes.waiting = "connected to NATS; opening the intent bucket"
    store = await open_store(nc, args.bucket, args.replicas)
    config = ClusterConfig(
        underlay_mtu=args.underlay_mtu,
        mesh_prefix=args.mesh_prefix,
        underlay_cidrs=args.underlay_cidrs,
        heartbeat_interval=args.heartbeat,
    )
    if not config.underlay_cidrs:
        log.warning(
            "controller: no --underlay-cidr: VM networks are kept off the nodes' own addresses"
            " only, not off their whole network; agents cannot keep VMs from other underlay hosts"
        )
    controller = Controller(nc, store, config, instance=args.instance, metrics=metrics)
    probes.waiting = "loading intent"
    await controller.start()
    probes.controller = controller
    log.info(
        "controller: serving on %s (heartbeat %.2fs, underlay MTU %d)",
        ",".join(args.nats),
        args.heartbeat,
        args.underlay_mtu,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("controller: stopping")
    await controller.stop()
    with contextlib.suppress(Exception):  # bounded: a dead bus must not hold the exit
        await asyncio.wait_for(nc.drain(), 3.0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_format, args.log_level)
    try:
        uvloop.run(run(args))
    except BusConfigError as e:
        sys.exit(f"otherix-controller: {e}")
    except (OSError, nats.errors.Error) as e:
        sys.exit(f"otherix-controller: cannot reach NATS at {','.join(args.nats)}: {e}")


if __name__ == "__main__":
    main()
