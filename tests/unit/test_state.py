"""agent.state: the state directory holds the node's private key, so 0700 with 0600 files,
also when someone loosened them by hand; the applied version is written whole or not at all."""

import stat

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
