"""agent.state: the state directory holds the node's private key, so 0700 with 0600 files,
also when someone loosened them by hand; the applied version is written whole or not at all."""

import os
import stat
import threading

import msgspec

from agent.state import AppliedState, load_applied, save_applied, secure_state_dir
from agent.wireguard.keys import load_or_create_private_key


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_state_dir_is_private(tmp_path):
    state = tmp_path / "agent"
    secure_state_dir(state)
    save_applied(state, AppliedState(version=7, digest="d"))
    load_or_create_private_key(state)
    assert mode(state) == 0o700
    assert {p.name: mode(p) for p in state.iterdir()} == {
        "applied.json": 0o600,
        "wireguard.key": 0o600,
    }
    assert load_applied(state) == AppliedState(version=7, digest="d")


def test_loosened_modes_are_tightened_at_start(tmp_path, caplog):
    state = tmp_path / "agent"
    secure_state_dir(state)
    save_applied(state, AppliedState(version=1))
    key = load_or_create_private_key(state)
    state.chmod(0o755)
    (state / "wireguard.key").chmod(0o644)
    (state / "applied.json").chmod(0o666)
    secure_state_dir(state)
    assert mode(state) == 0o700
    assert mode(state / "wireguard.key") == mode(state / "applied.json") == 0o600
    assert load_or_create_private_key(state) == key  # tightened, never replaced
    assert "wireguard.key was mode 644; set to 600" in caplog.text


def test_the_applied_version_is_overwritten_in_place_and_reads_back_whole(tmp_path):
    """Saved after every change: one in-place write of a fixed-size record (no rename), which
    must leave nothing of a longer record before it, nor of an older release's file."""
    state = tmp_path / "agent"
    secure_state_dir(state)
    (state / "applied.json").write_bytes(b'{"version":3,"digest":"' + b"x" * 100 + b'"}')  # old
    save_applied(state, AppliedState(version=4, digest="a" * 64))
    inode = (state / "applied.json").stat().st_ino
    for version, digest in ((5, "b" * 64), (6, "c"), (7, "")):
        save_applied(state, AppliedState(version=version, digest=digest))
        assert load_applied(state) == AppliedState(version=version, digest=digest)
    assert (state / "applied.json").stat().st_ino == inode  # in place: never renamed
    assert mode(state / "applied.json") == 0o600
    save_applied(state, AppliedState(version=8, digest="d" * 300))  # too long: written whole
    assert load_applied(state) == AppliedState(version=8, digest="d" * 300)
    save_applied(state, AppliedState(version=9, digest="e"))
    assert load_applied(state) == AppliedState(version=9, digest="e")


def test_a_link_in_place_of_the_record_is_replaced_never_written_through(tmp_path):
    state = tmp_path / "agent"
    secure_state_dir(state)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b" " * 256)  # the record's size: an in-place write would land there
    (state / "applied.json").symlink_to(elsewhere)
    save_applied(state, AppliedState(version=2, digest="d"))
    assert elsewhere.read_bytes() == b" " * 256
    assert not (state / "applied.json").is_symlink()
    assert load_applied(state) == AppliedState(version=2, digest="d")


def test_only_our_record_is_written_in_place(tmp_path):
    """The in-place write goes only into the record the rename left (regular, 0600, one link):
    a hard link's other name, a loosened mode or a FIFO (whose open would block the agent) are
    replaced whole, as the rename did (review20)."""
    state = tmp_path / "agent"
    secure_state_dir(state)
    record = state / "applied.json"
    save_applied(state, AppliedState(version=1, digest="a"))
    other = tmp_path / "other"
    os.link(record, other)  # the record's bytes under another name (a hard link planted there)
    save_applied(state, AppliedState(version=2, digest="b"))
    assert msgspec.json.decode(other.read_bytes(), type=AppliedState).version == 1
    os.chmod(record, 0o644)  # loosened while the agent runs: the next save makes it 0600 again
    save_applied(state, AppliedState(version=3, digest="c"))
    assert mode(record) == 0o600 and load_applied(state).version == 3
    record.unlink()
    os.mkfifo(record, 0o600)
    saving = threading.Thread(target=save_applied, args=(state, AppliedState(version=4)))
    saving.start()
    saving.join(5)
    if saving.is_alive():  # blocked in open(): a reader lets it go, then fail
        os.close(os.open(record, os.O_RDONLY | os.O_NONBLOCK))
        saving.join(5)
        raise AssertionError("the agent blocked on a FIFO in place of its record")
    assert stat.S_ISREG(record.lstat().st_mode) and load_applied(state).version == 4


def test_a_link_in_place_of_the_temporary_file_is_never_written_through(tmp_path):
    """The record of another size (or none) is written to applied.tmp and renamed: a link
    planted there must not truncate its target, and a leftover's loose mode must not stay."""
    state = tmp_path / "agent"
    secure_state_dir(state)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"precious")
    (state / "applied.tmp").symlink_to(elsewhere)
    save_applied(state, AppliedState(version=1, digest="a"))
    assert elsewhere.read_bytes() == b"precious"
    assert not (state / "applied.json").is_symlink() and load_applied(state).version == 1
    (state / "applied.tmp").write_bytes(b"left over")
    os.chmod(state / "applied.tmp", 0o644)
    (state / "applied.json").write_bytes(b"{}")  # another size: the rename path
    save_applied(state, AppliedState(version=2, digest="b"))
    assert mode(state / "applied.json") == 0o600 and load_applied(state).version == 2
