"""The agent's state directory: the applied version survives restarts (never apply older), and
the directory holds the node's WireGuard key, so it is 0700 and every file in it 0600.

The applied version is saved after every change, so on the hot path: a file of a fixed size
(``RECORD``, within one disk sector) is overwritten in place with one ``pwrite``, which a crash of
the agent cannot tear (a write-then-rename per version cost ~60 µs of the agent's CPU on ext4, plus
the flush ext4 starts for a rename over a file). Only a record that is new, of another size (an
older release's file) or too long, or a file that is not the record the rename left (a link, a
FIFO, a second name, a loosened mode) is written whole to a new temporary file (never through a
link) and renamed over it. Never fsynced (neither was the rename): after a power loss the node's
kernel state is gone as well."""

import contextlib
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


def _our_record(st: os.stat_result) -> bool:
    """A file the in-place write may overwrite: the record as the rename left it (a regular
    file of ``RECORD`` bytes, 0600, one link); anything else is replaced whole."""
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_size == RECORD
        and st.st_nlink == 1
        and stat.S_IMODE(st.st_mode) == FILE_MODE
    )


def save_applied(state_dir: Path, state: AppliedState) -> None:
    """Overwrite the fixed-size record in place; write-then-rename (0600) when there is none yet,
    so a crash never leaves a half-written file."""
    path = state_dir / "applied.json"
    data = msgspec.json.encode(state)
    if len(data) <= RECORD:
        data = data.ljust(RECORD)
        try:  # a link is replaced, as by a rename; a FIFO must not block the agent
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            pass
        else:
            try:
                if _our_record(os.fstat(fd)):
                    os.pwrite(fd, data, 0)
                    return
            finally:
                os.close(fd)
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a crash's leftover, or a link planted there: never written through
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
