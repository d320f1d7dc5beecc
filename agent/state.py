"""The agent's state directory: the applied version survives restarts (never apply older)."""

import os
from pathlib import Path

import msgspec


class AppliedState(msgspec.Struct, frozen=True, kw_only=True):
    version: int = 0
    digest: str = ""


def load_applied(state_dir: Path) -> AppliedState:
    path = state_dir / "applied.json"
    try:
        return msgspec.json.decode(path.read_bytes(), type=AppliedState)
    except FileNotFoundError:
        return AppliedState()
    except msgspec.DecodeError as e:
        raise SystemExit(
            f"otherix-agent: {path} is corrupt ({e}); move it away to start over"
        ) from None


def save_applied(state_dir: Path, state: AppliedState) -> None:
    """Write-then-rename so a crash never leaves a half-written file."""
    path = state_dir / "applied.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(state))
    os.replace(tmp, path)
