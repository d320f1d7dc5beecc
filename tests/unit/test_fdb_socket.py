import socket

from agent.links import fdb_socket as f


def test_encoded_entry_parses_back():
    msg = f.encode_entry(7, f.RTM_NEWNEIGH, f.NLM_F_REQUEST, 42, "02:aa:bb:cc:dd:ee", "100.64.0.2")
    [(kind, flags, seq, payload)] = list(f.parse_messages(msg))
    assert (kind, flags, seq) == (f.RTM_NEWNEIGH, f.NLM_F_REQUEST, 7)
    rec = f.parse_neigh(payload)
    assert rec == (42, "02:aa:bb:cc:dd:ee", "100.64.0.2", True, True)
    assert rec.ifindex == 42 and rec.dst == "100.64.0.2" and rec.permanent and rec.own


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
