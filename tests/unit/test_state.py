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
