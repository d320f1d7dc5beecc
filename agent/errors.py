"""The agent's one error hierarchy, and the result every subsystem's ``apply`` returns.

``ApplyError`` names the device, the operation and (when the kernel gave one) the errno; its
``temporary`` flag tells a retry (device busy or not there yet, daemon slow) from a refusal
(foreign device, bad value, missing kernel support). Appliers return these in an ``ApplyResult``
and keep going with the other items; only the edge (the ack) turns them into text.
This module does no I/O.
"""

import errno as errnos
import os
from dataclasses import dataclass
from typing import Generic, TypeVar

from schemas.naming import WIREGUARD_IFNAME

R = TypeVar("R")

# errno values a later heartbeat can clear by itself (the rest are refusals)
TEMPORARY_ERRNOS = frozenset(
    {
        errnos.EAGAIN,
        errnos.EBUSY,
        errnos.EINTR,
        errnos.ENOBUFS,
        errnos.ENOMEM,
        errnos.ETIMEDOUT,
        errnos.ENODEV,  # a device that vanished, or one this heartbeat has not created yet
        errnos.ENOENT,
    }
)


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ApplyError(AgentError):
    """One write (or the read it needed) failed on one device."""

    def __init__(
        self,
        device: str,
        op: str,
        message: str,
        *,
        errno: int | None = None,
        temporary: bool | None = None,
    ):
        super().__init__(f"{op} {device}: {message}")
        self.device, self.op, self.message, self.errno = device, op, message, errno
        self.temporary = errno in TEMPORARY_ERRNOS if temporary is None else temporary

    @classmethod
    def from_errno(cls, device: str, op: str, code: int, detail: str = "") -> "ApplyError":
        text = os.strerror(code) if code else "netlink error"
        return cls(device, op, f"{detail}: {text}" if detail else text, errno=code)

    @property
    def kind(self) -> tuple[str, str, int | str]:
        """What makes two failures "the same" for logging: op, device, errno (else message)."""
        return self.op, self.device, self.errno if self.errno is not None else self.message

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ApplyError) and (
            self.device,
            self.op,
            self.message,
            self.errno,
            self.temporary,
        ) == (other.device, other.op, other.message, other.errno, other.temporary)

    def __hash__(self) -> int:
        return hash((self.device, self.op, self.message))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(device={self.device!r}, op={self.op!r}, "
            f"message={self.message!r}, errno={self.errno}, temporary={self.temporary})"
        )


class Refused(ApplyError):
    """An action the agent will not execute: a foreign device or a bad value. Never temporary."""

    def __init__(self, device: str, op: str, message: str):
        super().__init__(device, op, message, temporary=False)


class WireGuardError(ApplyError):
    """The WireGuard device could not be configured (daemon failed, UAPI or genl error)."""

    def __init__(
        self,
        message: str,
        *,
        device: str = WIREGUARD_IFNAME,
        op: str = "wireguard",
        errno: int | None = None,
        temporary: bool = True,
    ):
        super().__init__(device, op, message, errno=errno, temporary=temporary)


class DeviceMissing(WireGuardError):
    """The WireGuard device (or wireguard-go's socket) is not there."""


class NftError(ApplyError):
    """``nft`` (or the forwarding sysctl) failed; the message carries its exit code and stderr."""

    def __init__(self, message: str, *, op: str = "nft", temporary: bool = False):
        super().__init__("table inet otherix", op, message, temporary=temporary)


@dataclass(frozen=True)
class ApplyResult(Generic[R]):
    """What one ``apply(plan)`` did: writes made, the state actually reached, typed errors."""

    writes: int
    reached: R
    errors: tuple[ApplyError, ...] = ()
