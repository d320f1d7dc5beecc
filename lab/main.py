"""``otherix-lab``: a whole Otherix cluster on this machine (root needed), and the demo.

otherix-lab up --nodes 3        # nats-server + controller + 3 agents in namespaces
otherix-lab up --controllers 2  # two controllers: one leads, the other takes over if it dies
otherix-lab status              # the lab's processes, which controller leads, convergence
otherix-lab vm add web --network lan --node n1
otherix-lab vm rm web
otherix-lab down                # removes everything, also after a crash
otherix-lab up --chaos --seed 7 # the same, with the fault proxy (lab.natsfault) on the bus
otherix-lab chaos drop 'otherix.v1.desired.*' -p 0.3   # then: dup, delay, partition n1, heal,
otherix-lab chaos stats         # stall, unstall, cut, clear (see otherix-lab chaos -h)
otherix-lab demo                # builds a lab, shows the networks working, tears it down
"""

import argparse
import asyncio
import json
import os
import sys
import time

import nats

from client.api import ApiError
from lab.cluster import MAX_CONTROLLERS, Lab
from lab.netns import LabError, check_prefix
from lab.topology import OUTSIDE_IP, cleanup_prefix, default_state_dir
from schemas.options import quiet_tls_close


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="otherix-lab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--prefix",
        default=os.environ.get("OTHERIX_LAB_PREFIX", "otlab"),
        help="name prefix of everything the lab creates",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a lab cluster and leave it running")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--underlay-mtu", type=int, default=1500)
    up.add_argument("--heartbeat", type=float, default=1.0)
    up.add_argument("--no-mesh", action="store_true", help="agents without the WireGuard mesh")
    up.add_argument("--nats-servers", type=int, default=1, choices=(1, 3),
                    help="3: a NATS cluster, intent replicated on every server")  # fmt: skip
    up.add_argument("--controllers", type=int, default=1, choices=range(1, MAX_CONTROLLERS + 1),
                    metavar=f"{{1..{MAX_CONTROLLERS}}}",
                    help="controller processes: one leads (a lease), the others follow")  # fmt: skip
    up.add_argument(
        "--chaos",
        action="store_true",
        help="controller and agents reach nats-server through the fault proxy (otherix-lab chaos)",
    )
    up.add_argument("--seed", type=int, default=0, help="the fault proxy's seed (with --chaos)")
    sub.add_parser("down", help="stop and remove everything the lab created")
    sub.add_parser("status", help="the lab's processes, the leading controller, convergence")
    vm = sub.add_parser("vm", help="VMs (namespaces wired to their taps)").add_subparsers(
        dest="vm_cmd", required=True
    )
    add = vm.add_parser("add")
    add.add_argument("name")
    add.add_argument("--network", required=True)
    add.add_argument("--node", required=True)
    add.add_argument("--ip")
    add.add_argument("--mac")
    rm = vm.add_parser("rm")
    rm.add_argument("name")
    add_chaos_parser(sub)
    demo = sub.add_parser(
        "demo", help="build a 2-node lab, show pings across nodes and through NAT, tear down"
    )
    demo.add_argument("--keep", action="store_true", help="leave the lab running afterwards")
    return p


def add_chaos_parser(sub) -> None:
    chaos = sub.add_parser(
        "chaos", help="faults on the bus of a lab started with 'up --chaos'"
    ).add_subparsers(dest="chaos_cmd", required=True)
    for name, action, what in [
        ("drop", "drop", "drop frames"),
        ("dup", "duplicate", "duplicate frames"),
        ("delay", "delay", "delay frames (later ones overtake them)"),
    ]:
        rule = chaos.add_parser(name, help=what)
        rule.set_defaults(action=action)
        rule.add_argument("subject", help="NATS subject pattern (* and > wildcards)")
        rule.add_argument("-p", type=float, default=1.0, help="probability per frame")
        rule.add_argument("--direction", choices=("to_server", "to_client"))
        rule.add_argument("--identity", help="controller, admin, viewer or a node name")
        rule.add_argument("--count", type=int, help="at most this many frames")
        if action == "duplicate":
            rule.add_argument("--copies", type=int, default=1, help="extra copies")
        if action == "delay":
            rule.add_argument("--seconds", type=float, required=True)
            rule.add_argument("--jitter", type=float, default=0.0)
    for name, what in [
        ("cut", "close the identity's connections (it reconnects)"),
        ("partition", "cut the identity and refuse it until 'heal'"),
        ("stall", "hold the identity's traffic both ways until 'unstall'"),
    ]:
        chaos.add_parser(name, help=what).add_argument("identity")
    for name, what in [("heal", "end a partition"), ("unstall", "release a stall")]:
        chaos.add_parser(name, help=what).add_argument("identity", nargs="?", help="default: all")
    chaos.add_parser("clear", help="remove every rule").add_argument("--seed", type=int)
    chaos.add_parser("stats", help="rules with their counters, connections, partitions, stalls")


def chaos_request(args: argparse.Namespace) -> dict:
    """The control-socket request (lab.natsfault) for an ``otherix-lab chaos`` command."""
    if args.chaos_cmd in ("drop", "dup", "delay"):
        request = {"cmd": "add_rule", "action": args.action, "subject": args.subject, "p": args.p}
        for key in ("direction", "identity", "count", "copies", "jitter"):
            if getattr(args, key, None) is not None:
                request[key] = getattr(args, key)
        if args.chaos_cmd == "delay":
            request["delay"] = args.seconds
        return request
    if args.chaos_cmd == "clear":
        return {"cmd": "clear", "seed": args.seed}
    return {"cmd": args.chaos_cmd} | (
        {"identity": args.identity} if getattr(args, "identity", None) else {}
    )


async def cmd_chaos(args: argparse.Namespace) -> int:
    answer = await Lab.load(args.prefix).chaos(chaos_request(args))
    if not answer.pop("ok", False):
        raise LabError(f"chaos {args.chaos_cmd}: {answer.get('error')}")
    say(json.dumps(answer, indent=2 if args.chaos_cmd == "stats" else None))
    return 0


def say(text: str) -> None:
    print(text, flush=True)


async def cmd_up(args: argparse.Namespace) -> int:
    if not 1 <= args.nodes <= 200:
        raise LabError(f"--nodes {args.nodes}: between 1 and 200")
    lab = Lab(
        args.prefix,
        underlay_mtu=args.underlay_mtu,
        heartbeat=args.heartbeat,
        mesh=not args.no_mesh,
        nats_port=14222 if args.prefix == "otlab" else None,
        faults=args.chaos,
        fault_seed=args.seed,
        fault_process=args.chaos,
        nats_servers=args.nats_servers,
        controllers=args.controllers,
    )
    started = time.monotonic()
    await lab.up(args.nodes)
    say(f"lab {args.prefix}: {args.nodes} node(s) converged in {time.monotonic() - started:.1f}s")
    leader = await lab.leader()
    followers = [n for n in lab.controller_names if n != leader]
    say(f"  leading controller: {lab.controller_instance(leader)} ({leader}.log)"
        + (f"; following: {', '.join(map(lab.controller_instance, followers))}" if followers else ""))  # fmt: skip
    for var, value in lab.bus_env("admin").items():
        say(f"  export {var}={value}")
    say(f"  logs and state: {lab.state_dir}")
    if args.chaos:
        say(f"  chaos proxy: {lab.bus_target} (seed {args.seed}); otherix-lab chaos --help")
    say(f"  outside host: {OUTSIDE_IP} (netns {lab.topology.outside})")
    await lab.close()
    return 0


async def _status(lab: Lab):
    return await (await lab.connect()).status()


async def cmd_status(args: argparse.Namespace) -> int:
    """What runs, who leads and whether the nodes converged; 1 when something is down."""
    lab = Lab.load(args.prefix)
    try:
        try:
            status = await asyncio.wait_for(_status(lab), 5.0)
        except (ApiError, TimeoutError, OSError, nats.errors.Error) as e:
            status = None
            say(f"lab {args.prefix}: no controller answers ({e or 'timeout'})")
        leading = status.leader if status is not None else None
        processes = lab.processes()
        for name, pid in processes.items():
            role = ""
            if name in lab.controller_names and pid is not None:
                role = "  leading" if lab.controller_instance(name) == leading else "  following"
            state = "down" if pid is None else f"pid {pid}"
            say(f"  {name:<16} {state}{role}")
        if status is not None:
            converged = "all converged" if status.converged else "not converged"
            say(
                f"  {len(status.nodes)} node(s), {converged}; leading controller: {status.leader or 'none'}"
            )
    finally:
        await lab.close()
    return 0 if status is not None and all(processes.values()) else 1


async def cmd_vm(args: argparse.Namespace) -> int:
    lab = Lab.load(args.prefix)
    try:
        if args.vm_cmd == "add":
            vm = await lab.vm_add(args.name, args.network, args.node, ip=args.ip, mac=args.mac)
            say(
                f"vm {args.name}: {vm.ip_cidr} mac {vm.mac} on tap {vm.tap} (node {args.node}); shell: ip netns exec {vm.netns} bash"
            )
        else:
            await lab.vm_rm(args.name)
            say(f"vm {args.name} removed")
    finally:
        await lab.close()
    return 0


async def run_ctl(lab: Lab, *argv: str) -> None:
    """Show what an operator would type and see."""
    say(f"$ otherixctl {' '.join(argv)}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client.cli",
        *argv,
        env={**os.environ, **lab.bus_env("admin")},
    )
    await proc.wait()


async def check(what: str, ok: bool) -> bool:
    say(f"  {'ok  ' if ok else 'FAIL'} {what}")
    return ok


async def cmd_demo(args: argparse.Namespace) -> int:
    lab = Lab(args.prefix, heartbeat=1.0)
    results = []
    try:
        say("== bringing up a 2-node lab (nats-server with JetStream, controller, 2 agents)")
        await lab.up(2)
        api = await lab.connect()
        say("\n== bridge network with NAT egress, two VMs on node n1")
        await run_ctl(
            lab,
            "network",
            "create",
            "lan",
            "--type",
            "bridge",
            "--subnet",
            "10.10.0.0/24",
            "--egress",
            "nat",
        )
        a = await lab.vm_add("a", "lan", "n1")
        b = await lab.vm_add("b", "lan", "n1")
        await lab.wait_converged()
        results.append(
            await check(
                f"vm a ({a.ip}) pings vm b ({b.ip}) on the same bridge",
                await lab.ping("a", b.ip, count=3),
            )
        )
        seen = await lab.outside_sees("a")
        results.append(
            await check(
                f"vm a reaches the outside host {OUTSIDE_IP}; it sees source {seen} (node n1's address)",
                seen == lab.topology.nodes["n1"].underlay_ip,
            )
        )

        say("\n== overlay network (VXLAN over the WireGuard mesh), VMs on n1 and n2")
        await run_ctl(
            lab, "network", "create", "ov", "--type", "overlay", "--subnet", "10.20.0.0/24"
        )
        c = await lab.vm_add("c", "ov", "n1")
        d = await lab.vm_add("d", "ov", "n2")
        await lab.wait_converged()
        results.append(
            await check(
                f"vm c ({c.ip}, n1) pings vm d ({d.ip}, n2) across the mesh",
                await lab.ping("c", d.ip, count=3, timeout=5),
            )
        )
        results.append(
            await check(
                "a 1390-byte DF ping crosses (overlay MTU 1390)",
                await lab.ping("c", d.ip, size=1390 - 28, dont_fragment=True),
            )
        )

        say("")
        await run_ctl(lab, "nic", "list")
        say("")
        await run_ctl(lab, "node", "list")
        say("")
        await run_ctl(lab, "status")
        status = await api.status()
        results.append(await check("every node converged", status.converged))
    finally:
        if args.keep:
            exports = " ".join(f"{k}={v}" for k, v in lab.bus_env("admin").items())
            say(f"\nlab left running; export {exports}; 'otherix-lab down' removes it")
            await lab.close()
        else:
            say("\n== tearing down")
            await lab.down()
    say(f"\ndemo: {sum(results)} of {len(results)} checks passed")
    return 0 if all(results) else 1


async def run(args: argparse.Namespace) -> int:
    check_prefix(args.prefix)
    match args.cmd:
        case "up":
            return await cmd_up(args)
        case "down":
            await cleanup_prefix(args.prefix, default_state_dir(args.prefix))
            Lab(args.prefix).forget()
            say(f"lab {args.prefix}: down")
            return 0
        case "status":
            return await cmd_status(args)
        case "vm":
            return await cmd_vm(args)
        case "chaos":
            return await cmd_chaos(args)
        case "demo":
            return await cmd_demo(args)
    return 2


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("otherix-lab: must run as root (it creates network namespaces)")
    quiet_tls_close()
    try:
        sys.exit(asyncio.run(run(args)))
    except (LabError, ApiError) as e:
        sys.exit(f"otherix-lab: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
