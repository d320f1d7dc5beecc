import errno
import socket
import struct

from agent.links import fdb_socket as f


def test_encoded_entry_parses_back():
    msg = f.encode_entry(7, f.RTM_NEWNEIGH, f.NLM_F_REQUEST, 42, "02:aa:bb:cc:dd:ee", "100.64.0.2")
    [(kind, flags, seq, payload)] = list(f.parse_messages(msg))
    assert (kind, flags, seq) == (f.RTM_NEWNEIGH, f.NLM_F_REQUEST, 7)
    rec = f.parse_neigh(payload)
    assert rec == (42, "02:aa:bb:cc:dd:ee", "100.64.0.2", f.NUD_PERMANENT, f.NTF_SELF, 0, 0)
    assert rec.ifindex == 42 and rec.dst == "100.64.0.2" and rec.permanent and rec.own
    assert not rec.static and not rec.master and rec.vlan == 0


def test_master_entry_is_static_not_permanent_and_has_no_dst():
    # "permanent" on a bridge port means the bridge's own address: frames would go to the host
    msg = f.encode_entry(1, f.RTM_NEWNEIGH, 0, 5, "02:00:00:00:00:01", None, master=True)
    rec = f.parse_neigh(next(f.parse_messages(msg))[3])
    assert (rec.state, rec.flags, rec.dst) == (f.NUD_NOARP, f.NTF_MASTER, None)
    assert rec.static and not rec.permanent and not rec.own


def test_dumped_bridge_entry_names_its_bridge_and_vlan():
    # as the kernel dumps a bridge entry: no NTF flag, the bridge in NDA_MASTER, a VLAN
    body = struct.pack("=BxxxiHBB", socket.AF_BRIDGE, 4, f.NUD_NOARP, 0, 0)
    body += f._attr(f.NDA_LLADDR, bytes.fromhex("02aa00000001"))
    body += f._attr(f.NDA_MASTER, struct.pack("=I", 2))
    body += f._attr(f.NDA_VLAN, struct.pack("=H", 7))
    rec = f.parse_neigh(body)
    assert (rec.ifindex, rec.mac, rec.master, rec.vlan, rec.static) == (
        4,
        "02:aa:00:00:00:01",
        2,
        7,
        True,
    )


def test_entry_without_dst_and_several_messages_in_one_buffer():
    buf = f.encode_entry(1, f.RTM_DELNEIGH, 0, 3, "00:00:00:00:00:00", None)
    buf += f.encode_entry(2, f.RTM_DELNEIGH, 0, 4, "02:00:00:00:00:01", "10.0.0.1")
    parsed = [f.parse_neigh(p) for _, _, _, p in f.parse_messages(buf)]
    assert [(r.ifindex, r.mac, r.dst) for r in parsed] == [
        (3, "00:00:00:00:00:00", None),
        (4, "02:00:00:00:00:01", "10.0.0.1"),
    ]


def test_message_is_aligned_and_family_is_bridge():
    msg = f.encode_entry(1, f.RTM_NEWNEIGH, 0, 1, "02:00:00:00:00:01", "10.0.0.1")
    assert len(msg) % 4 == 0
    assert msg[16] == socket.AF_BRIDGE


def test_truncated_buffer_stops_cleanly():
    msg = f.encode_entry(1, f.RTM_NEWNEIGH, 0, 1, "02:00:00:00:00:01", "10.0.0.1")
    assert list(f.parse_messages(msg[:10])) == []


class AckingSocket:
    """Records every request and answers with the errno chosen per MAC (0 = success)."""

    def __init__(self, answers: dict[str, int]):
        self.answers, self.sent, self.acks = answers, [], b""

    def send(self, data: bytes) -> None:
        for kind, flags, seq, payload in f.parse_messages(data):
            rec = f.parse_neigh(payload)
            self.sent.append((kind, flags, rec))
            code = self.answers.get(rec.mac, 0)
            if code or flags & f.NLM_F_ACK:  # like the kernel: failures always, successes if asked
                err = struct.pack("=i", -code) + data[:16]
                self.acks += struct.pack("=IHHII", 16 + len(err), f.NLMSG_ERROR, 0, seq, 0) + err

    def recv(self, _size: int) -> bytes:
        acks, self.acks = self.acks, b""
        return acks


def socket_with(answers: dict[str, int]) -> tuple[f.FdbSocket, AckingSocket]:
    fdb = f.FdbSocket.__new__(f.FdbSocket)
    fdb.sock, fdb.seq = AckingSocket(answers), 0
    return fdb, fdb.sock


def test_replace_is_one_message_with_create_and_replace_never_append():
    fdb, sock = socket_with({})
    assert fdb.change(f.REPLACE, [(3, "02:00:00:00:00:01", "10.0.0.2")]) == []
    [(kind, flags, rec)] = sock.sent
    assert kind == f.RTM_NEWNEIGH
    assert flags & f.NLM_F_REPLACE and flags & f.NLM_F_CREATE and not flags & f.NLM_F_APPEND
    assert (rec.ifindex, rec.mac, rec.dst, rec.own) == (3, "02:00:00:00:00:01", "10.0.0.2", True)


def test_master_replace_writes_static_bridge_entries():
    fdb, sock = socket_with({})
    assert fdb.change(f.REPLACE, [(4, "02:00:00:00:00:01", None)], master=True) == []
    [(kind, flags, rec)] = sock.sent
    assert flags & f.NLM_F_REPLACE and rec.flags == f.NTF_MASTER and rec.state == f.NUD_NOARP


def test_failures_matched_to_their_position_and_idempotent_answers_ignored():
    entries = [(3, f"02:00:00:00:00:{i:02x}", None) for i in range(1, 5)]
    fdb, _ = socket_with({"02:00:00:00:00:02": errno.ENOENT, "02:00:00:00:00:04": errno.EINVAL})
    assert fdb.change(f.DELETE, entries) == [(3, errno.EINVAL)]  # ENOENT: already gone
    fdb, _ = socket_with({"02:00:00:00:00:02": errno.EEXIST})
    assert fdb.change(f.REPLACE, entries) == [(1, errno.EEXIST)]  # replace never expects it
    fdb, _ = socket_with({"02:00:00:00:00:02": errno.EEXIST})
    assert fdb.change(f.APPEND, entries) == []


def test_one_ack_per_chunk_and_a_failure_in_the_middle_still_counted():
    entries = [(3, f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}", None) for i in range(f.CHUNK + 10)]
    fdb, sock = socket_with({entries[7][1]: errno.EINVAL, entries[f.CHUNK + 2][1]: errno.EBUSY})
    assert fdb.change(f.REPLACE, entries) == [(7, errno.EINVAL), (f.CHUNK + 2, errno.EBUSY)]
    acked = [i for i, (_, flags, _) in enumerate(sock.sent) if flags & f.NLM_F_ACK]
    assert acked == [f.CHUNK - 1, len(entries) - 1]  # the last request of each chunk
