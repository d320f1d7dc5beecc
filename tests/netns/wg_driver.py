"""Test driver: one WireGuardApplier on uvloop (as in the agent), steered by JSON lines on stdin.

Run inside a node's namespaces by ``test_wireguard_userspace.py``. Each request is one line
``{"op": ..., ...}``; each answer is one line of JSON (``{"error": ...}`` on failure).
ops: apply {spec, private_key?} -> {writes, backend, public_key}; change {spec, base, gained,
lost} -> {writes (None: not taken), errors} (the mesh change path, ``apply_change``); forget {key}
(a peer removed behind the applier's back, over UAPI); peers -> {peers}; pid -> {pid}; remove;
exit.
"""

import asyncio
import json
import logging
import os
import sys

import msgspec
import uvloop

from agent.links.applier import LinkApplier
from agent.links.netlink import NetlinkLinks
from agent.netlink_thread import NetlinkThread
from agent.wireguard import keys as wgkeys
from agent.wireguard.applier import WireGuardApplier
from schemas.desired import WgPeer, WireGuard


async def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    netlink = NetlinkThread()  # as in the agent: link work on its own netlink thread
    netlink.start()
    try:
        await serve(netlink)
    finally:
        netlink.stop()


async def serve(netlink: NetlinkThread) -> None:
    links = LinkApplier(NetlinkLinks(netlink))
    applier = WireGuardApplier(links, private_key=os.environ["OTWG_TEST_KEY"], check_interval=0.2)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        req = json.loads(line)
        try:
            match req["op"]:
                case "apply":
                    if "private_key" in req:
                        applier.private_key = req["private_key"]
                    spec = msgspec.convert(req["spec"], WireGuard)
                    # as the agent's heartbeat does: one link dump, then observe → plan → apply
                    result = await applier.reconcile(spec, await links.observe())
                    if result.errors:
                        raise result.errors[0]
                    out = {
                        "writes": result.writes,
                        "backend": applier.backend_name,
                        "public_key": applier.public_key,
                    }
                case "change":
                    result = await applier.apply_change(
                        msgspec.convert(req["spec"], WireGuard),
                        msgspec.convert(req["base"], WireGuard),
                        msgspec.convert(req["gained"], list[WgPeer]),
                        msgspec.convert(req["lost"], list[WgPeer]),
                    )
                    out = {
                        "writes": None if result is None else result.writes,
                        "errors": [] if result is None else [str(e) for e in result.errors],
                    }
                case "forget":
                    await uapi_set(
                        applier, f"public_key={wgkeys.b64_to_hex(req['key'])}\nremove=true"
                    )
                    out = {}
                case "peers":
                    out = {"peers": msgspec.to_builtins(await applier.peers())}
                case "pid":
                    out = {"pid": await applier.daemon_pid()}
                case "remove":
                    await applier.remove()
                    out = {}
                case "exit":
                    break
        except Exception as exc:  # report, keep serving
            logging.exception("request failed")
            out = {"error": repr(exc)}
        print(json.dumps(out), flush=True)
    await applier.close()


async def uapi_set(applier: WireGuardApplier, lines: str) -> None:
    """A raw UAPI ``set`` on the applier's daemon, as an operator's ``wg set`` would do."""
    reader, writer = await asyncio.open_unix_connection(str(applier._backend.uapi.path))
    try:
        writer.write(f"set=1\n{lines}\n\n".encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
        assert answer == b"errno=0\n\n", answer
    finally:
        writer.close()


if __name__ == "__main__":
    uvloop.run(main())
