"""The agent's state directory: the applied version survives restarts (never apply older), and
the directory holds the node's WireGuard key, so it is 0700 and every file in it 0600.

The applied version is saved after every change, so on the hot path: a file of a fixed size
(``RECORD``, within one disk sector) is overwritten in place with one ``pwrite``, which a crash of
the agent cannot tear (a write-then-rename per version cost ~60 µs of the agent's CPU on ext4, plus
the flush ext4 starts for a rename over a file). Only a record that is new, of another size (an
older release's file) or too long is written whole to a temporary file and renamed over it. Never
fsynced (neither was the rename): after a power loss the node's kernel state is gone as well."""

import logging
import os
import stat
from pathlib import Path

import msgspec

log = logging.getLogger(__name__)

DIR_MODE, FILE_MODE = 0o700, 0o600


class AppliedState(msgspec.Struct, frozen=True, kw_only=True):
    version: int = 0
    digest: str = ""


def secure_state_dir(state_dir: Path) -> None:
    """Create the directory 0700, and tighten it and its files where someone loosened them."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    for path, mode in [(state_dir, DIR_MODE), *((p, FILE_MODE) for p in state_dir.iterdir())]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue  # never chmod through a link to somewhere else
        if stat.S_IMODE(st.st_mode) & ~mode:
            log.warning("%s was mode %o; set to %o", path, stat.S_IMODE(st.st_mode), mode)
            os.chmod(path, mode)


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


RECORD = 256  # bytes of applied.json: JSON padded with spaces, one write within one sector


def save_applied(state_dir: Path, state: AppliedState) -> None:
    """Overwrite the fixed-size record in place; write-then-rename (0600) when there is none yet,
    so a crash never leaves a half-written file."""
    path = state_dir / "applied.json"
    data = msgspec.json.encode(state)
    if len(data) <= RECORD:
        data = data.ljust(RECORD)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)  # a link is replaced, as by a rename
        except OSError:
            pass
        else:
            try:
                if os.fstat(fd).st_size == RECORD:
                    os.pwrite(fd, data, 0)
                    return
            finally:
                os.close(fd)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
