"""``python -m bench [NAME ...]``: run the named benchmarks (default: all)."""

import asyncio
import sys

from bench import agent_steady, attach_ack, fdb_apply, heartbeat, overlay_ping, port_security, scale
from schemas.options import quiet_tls_close

BENCHES = {
    "attach_ack": attach_ack.main,
    "overlay_ping": overlay_ping.main,
    "fdb_apply": fdb_apply.main,
    "agent_steady": agent_steady.main,
    "heartbeat": heartbeat.main,
    "port_security": port_security.main,
    "scale": scale.main,  # options after the names: see ``bench.scale``
}


def main() -> None:
    quiet_tls_close()
    args = sys.argv[1:]
    cut = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    names = args[:cut] or list(BENCHES)  # what follows is the benches' own options
    for name in names:
        if name not in BENCHES:
            sys.exit(f"unknown benchmark {name!r}; choose from {', '.join(BENCHES)}")
    for name in names:
        print(f"== {name}", flush=True)
        asyncio.run(BENCHES[name]())


if __name__ == "__main__":
    main()
