"""Which NICs the agent announces (gratuitous ARP) and the frame it sends; no sockets here."""

import asyncio

import pytest

from agent.announce import Announcement, Announcer, garp_frame, plan
from schemas.desired import Tap


def tap(name, ip, mac, bridge="otb1000"):
    return Tap(name=name, bridge=bridge, mtu=1390, mac=mac, ip=ip)


A = tap("ota", "10.0.0.2", "02:00:00:00:00:0a")
B = tap("otb", "10.0.0.3", "02:00:00:00:00:0b")


def test_new_nics_are_announced_once():
    due, known = plan({}, [A, B])
    assert due == [
        Announcement("otb1000", "10.0.0.2", A.mac),
        Announcement("otb1000", "10.0.0.3", B.mac),
    ]
    assert plan(known, [A, B])[0] == []  # the next heartbeat: nothing new


def test_a_new_mac_for_an_address_is_announced_and_a_nic_that_went_is_forgotten():
    _, known = plan({}, [A])
    reused = tap("otc", "10.0.0.2", "02:00:00:00:00:0c")  # detached A, new NIC at A's address
    assert plan(known, [reused])[0] == [Announcement("otb1000", "10.0.0.2", reused.mac)]
    _, known = plan(known, [])
    assert plan(known, [A])[0] == [Announcement("otb1000", "10.0.0.2", A.mac)]


def test_nics_without_address_or_mac_are_not_announced():
    assert plan({}, [tap("otd", "", "02:00:00:00:00:0d"), tap("ote", "10.0.0.9", "")])[0] == []


def test_frame_is_a_broadcast_arp_request_with_sender_ip_equal_target_ip():
    frame = garp_frame("02:00:00:00:00:0a", "10.0.0.2")
    mac, ip = bytes.fromhex("02000000000a"), bytes([10, 0, 0, 2])
    assert len(frame) == 42
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac and frame[12:14] == b"\x08\x06"
    arp = frame[14:]
    assert arp[:8] == bytes.fromhex("0001080006040001")  # Ethernet/IPv4, request
    assert arp[8:14] == mac and arp[14:18] == ip and arp[24:28] == ip


@pytest.mark.asyncio
async def test_announcer_sends_a_few_times_over_one_heartbeat_and_survives_a_missing_bridge():
    sent = []

    def send(bridge, frame):
        if bridge == "otgone":
            raise OSError("no such device")
        sent.append((bridge, frame))

    announcer = Announcer("n1", send)
    announcer.update([A, tap("otx", "10.0.0.7", "02:00:00:00:00:07", bridge="otgone")], 0.09)
    await asyncio.sleep(0.2)
    assert sent == [("otb1000", garp_frame(A.mac, A.ip))] * 4
    announcer.update([A], 0.09)  # nothing new
    await asyncio.sleep(0.05)
    assert len(sent) == 4
    await announcer.close()


@pytest.mark.asyncio
async def test_a_restarted_agent_announces_only_what_changed_while_it_was_down(tmp_path):
    """A rolling upgrade must not flood every NIC's announcement to every node again."""
    sent = []
    first = Announcer("n1", lambda bridge, frame: sent.append(frame), state_dir=tmp_path)
    first.update([A, B], 0.01)
    await asyncio.sleep(0.05)
    await first.close()
    assert len(sent) == 8
    assert oct((tmp_path / "announced.json").stat().st_mode & 0o777) == "0o600"
    sent.clear()
    reused = tap("otc", "10.0.0.3", "02:00:00:00:00:0c")  # B went and came back while down
    again = Announcer("n1", lambda bridge, frame: sent.append(frame), state_dir=tmp_path)
    assert again.update([A, reused], 0.01) == [Announcement("otb1000", "10.0.0.3", reused.mac)]
    await asyncio.sleep(0.05)
    await again.close()
    assert sent == [garp_frame(reused.mac, reused.ip)] * 4


@pytest.mark.asyncio
async def test_announcements_spread_over_a_heartbeat_even_when_the_change_came_at_once():
    """The snapshot that brings a new NIC is published at once, a moment after the previous
    heartbeat: its gap is tiny, but the four frames still spread over about a heartbeat."""
    times = []
    loop = asyncio.get_running_loop()
    announcer = Announcer("n1", lambda bridge, frame: times.append(loop.time()))
    announcer.update([], 0.3)  # heartbeats so far
    announcer.update([A], 0.01)  # the change, published right after
    await asyncio.sleep(0.45)
    await announcer.close()
    assert len(times) == 4 and times[-1] - times[0] >= 0.25, times


@pytest.mark.asyncio
async def test_a_nic_that_went_stops_being_announced_at_once():
    """Detached while its frames still go out, then its address given to a new NIC on another
    node: the old MAC must not be announced after that, or it undoes the new announcement."""
    sent = []
    announcer = Announcer("n1", lambda bridge, frame: sent.append(frame))
    announcer.update([], 0.2)  # heartbeats so far
    announcer.update([A], 0.01)  # A's first frame goes at once, three more over 0.2 s
    await asyncio.sleep(0.01)
    announcer.update([], 0.01)  # A detached
    await asyncio.sleep(0.3)
    await announcer.close()
    assert sent == [garp_frame(A.mac, A.ip)]
