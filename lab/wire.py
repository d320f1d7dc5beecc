"""The lab's "hypervisor" for one VM NIC: copies frames between an agent's tap and a VM veth.

Run inside the node's namespace (``ip netns exec NODE_NS python -m lab.wire --tap T --netns VM
--ifname wire0``). It attaches to the *existing* persistent tap exactly like a hypervisor
(``/dev/net/tun``, ``TUNSETIFF`` with ``IFF_TAP | IFF_NO_PI``), then moves into the VM namespace
and opens an ``AF_PACKET`` socket on ``wire0``, the peer of the guest's ``eth0``.

It never creates a tap: ``TUNSETIFF`` on a missing name would create a non-persistent one, so it
waits for the name to exist and refuses a tap that turns out not to be persistent. It exits when
the tap goes away (NIC detached) and on SIGTERM.

Both ends use the virtio-net header (``IFF_VNET_HDR`` / ``PACKET_VNET_HDR``), as QEMU does: a
veth hands an ``AF_PACKET`` socket TCP segments with the checksum still to be filled in and
64 KiB GSO super-frames; the header carries that state to the tap, whose kernel side finishes
the job, instead of putting broken frames on the wire.
"""

import argparse
import errno
import fcntl
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time

from lab.netns import mark_ready, switch_netns

log = logging.getLogger("lab.wire")

TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_PERSIST = 0x0800
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23  # Linux >= 4.20: don't see frames wire0 itself transmits
BUF = 65536 + 64  # a GSO frame (64 KiB) plus the 10-byte virtio-net header
BATCH = 64  # frames per wake-up per direction, so one side cannot starve the other


def _tap_flags(fd: int) -> int:
    ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    return struct.unpack("16sH", ifr[:18])[1]


def open_tap(name: str, timeout: float) -> int:
    """Attach to the existing persistent tap ``name``, waiting up to ``timeout`` for it."""
    deadline = time.monotonic() + timeout
    waiting = False
    while True:
        try:
            socket.if_nametoindex(name)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"tap {name} did not appear within {timeout}s") from None
            if not waiting:  # once: tests wait for this line rather than sleeping
                log.info("waiting for tap %s", name)
                waiting = True
            time.sleep(0.1)
            continue
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            if _tap_flags(fd) & IFF_PERSIST:
                return fd
        except OSError as e:
            os.close(fd)
            # the agent still holds the tap it is creating (TUNSETIFF, then TUNSETPERSIST)
            if e.errno == errno.EBUSY and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise
        # the tap vanished between the check and the ioctl, so we created one: drop it
        os.close(fd)
        log.warning("tap %s vanished while attaching; waiting again", name)


def open_packet(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((ifname, ETH_P_ALL))
    sock.setblocking(False)
    return sock


def copy_loop(tap: int, sock: socket.socket, tap_name: str) -> None:
    """Copy frames both ways until the tap goes away (returns) or a signal ends the process."""
    buf = bytearray(BUF)
    view = memoryview(buf)
    sel = selectors.DefaultSelector()
    sel.register(tap, selectors.EVENT_READ, "tap")
    sel.register(sock, selectors.EVENT_READ, "sock")
    try:
        while True:
            events = sel.select(timeout=1.0)
            if not events:
                _tap_flags(tap)  # EBADFD once the tap is deleted; raised as OSError below
            for key, _ in events:
                for _ in range(BATCH):
                    if key.data == "tap":
                        try:
                            n = os.readv(tap, [view])
                        except BlockingIOError:
                            break
                        try:
                            sock.send(view[:n])
                        except (BlockingIOError, OSError) as e:
                            # a wire drops what it cannot carry (full buffer, frame too big)
                            log.debug("drop frame to VM (%d bytes): %s", n, e)
                    else:
                        try:
                            n = sock.recv_into(view)
                        except BlockingIOError:
                            break
                        try:
                            os.write(tap, view[:n])
                        except OSError as e:
                            if e.errno in (errno.EBADFD, errno.EIO, errno.ENODEV):
                                raise
                            log.debug("drop frame to tap (%d bytes): %s", n, e)
    except OSError as e:
        if e.errno in (errno.EBADFD, errno.EIO, errno.ENODEV, errno.ENXIO):
            log.info("tap %s is gone (%s); exiting", tap_name, os.strerror(e.errno))
            return
        raise
    finally:
        sel.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.wire", description=__doc__.split("\n")[0])
    ap.add_argument("--tap", required=True, help="persistent tap in this namespace")
    ap.add_argument("--netns", required=True, help="the VM's network namespace")
    ap.add_argument("--ifname", default="wire0", help="interface in the VM namespace")
    ap.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the tap")
    ap.add_argument("--ready-file", help="created once attached to the tap")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s wire[{args.tap}] %(levelname)s %(message)s"
    )
    # SIGTERM interrupts select() by raising SystemExit, so the finally blocks close the fds
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        tap = open_tap(args.tap, args.wait)
    except (OSError, TimeoutError) as e:
        log.error("cannot attach to tap %s: %s", args.tap, e)
        return 1
    try:
        switch_netns(args.netns)  # after the tap: the tap's name only resolves in the node ns
        with open_packet(args.ifname) as sock:
            log.info("attached tap %s <-> %s in %s", args.tap, args.ifname, args.netns)
            mark_ready(args.ready_file)
            copy_loop(tap, sock, args.tap)
    except OSError as e:
        log.error("wire %s <-> %s/%s failed: %s", args.tap, args.netns, args.ifname, e)
        return 1
    finally:
        os.close(tap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
