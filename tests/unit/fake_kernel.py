"""A fake kernel for the links subsystem: holds ``Observed`` state and executes actions like netlink.

It models what matters to the planner: kinds, MTUs, masters, up flags, addresses, FDB, and the
kernel's habit of deleting a device's ports' master link and FDB with it. ``fail`` makes chosen
actions fail with an errno, as the kernel would; the async methods make it the ``LinkKernel``
behind a real ``LinkApplier``.
"""

import msgspec

from agent.errors import ApplyError, ApplyResult
from agent.links import model as m
from schemas.desired import FdbEntry


class FakeKernel:
    def __init__(self, observed: m.Observed | None = None):
        observed = observed or m.Observed()
        self.links = dict(observed.links)
        self.fdb = {k: set(v) for k, v in observed.fdb.items()}
        self.learned = {k: set(v) for k, v in observed.learned.items()}
        self.writes = 0
        self.fail: dict[tuple[str, str], int] = {}  # (action name, device) -> errno

    def observe_now(self) -> m.Observed:
        return m.Observed(
            links=dict(self.links),
            fdb={k: frozenset(v) for k, v in self.fdb.items()},
            learned={k: frozenset(v) for k, v in self.learned.items()},
        )

    def _set(self, name: str, **changes) -> None:
        self.links[name] = msgspec.structs.replace(self.links[name], **changes)

    # --- the LinkKernel seam ------------------------------------------------------------------

    async def observe(self) -> m.Observed:
        return self.observe_now()

    async def observe_link(self, name: str) -> m.Link | None:
        return self.links.get(name)

    async def execute(self, plan: m.LinkPlan) -> ApplyResult[frozenset[str]]:
        done, errors = 0, []
        for a in plan.actions:
            device = a.device if isinstance(a, m.AddFdb | m.DelFdb) else a.name
            code = self.fail.get((type(a).__name__, device))
            if code is not None:
                errors.append(ApplyError.from_errno(device, type(a).__name__, code))
                continue
            try:
                self.apply([a])
            except KeyError as e:  # like netlink: ENODEV for a device that is not there
                errors.append(
                    ApplyError(device, type(a).__name__, f"device {e.args[0]} not found", errno=19)
                )
                continue
            done += 1
        return ApplyResult(writes=done, reached=frozenset(self.links), errors=tuple(errors))

    # --- the kernel's behaviour ---------------------------------------------------------------

    def apply(self, actions: list[m.Action]) -> None:
        for a in actions:
            self.writes += 1
            match a:
                case m.CreateBridge(name, mtu):
                    assert name not in self.links, f"{name} exists"
                    self.links[name] = m.Link(name=name, kind="bridge", mtu=mtu, up=False)
                case m.CreateTap(name, mtu):
                    assert name not in self.links
                    self.links[name] = m.Link(name=name, kind="tun", mtu=mtu, up=False)
                case m.CreateVxlan(name, vni, local, port, mtu):
                    assert name not in self.links
                    info = m.VxlanInfo(vni=vni, local=local, port=port, learning=False)
                    self.links[name] = m.Link(
                        name=name, kind="vxlan", mtu=mtu, up=False, vxlan=info
                    )
                    self.fdb[name], self.learned[name] = set(), set()
                case m.SetMtu(name, mtu):
                    self._set(name, mtu=mtu)
                case m.SetMaster(name, master):
                    assert master is None or self.links[master].kind == "bridge"
                    self._set(name, master=master)
                case m.SetUp(name):
                    self._set(name, up=True)
                case m.AddAddress(name, address):
                    self._set(name, addresses=self.links[name].addresses | {address})
                case m.DelAddress(name, address):
                    self._set(name, addresses=self.links[name].addresses - {address})
                case m.DeleteLink(name):
                    self.links.pop(name, None)
                    self.fdb.pop(name, None)
                    self.learned.pop(name, None)
                    for other in list(self.links.values()):
                        if other.master == name:
                            self._set(other.name, master=None)
                case m.AddFdb(device, mac, dst):
                    self.fdb[device].add(FdbEntry(mac=mac, dst=dst))
                case m.DelFdb(device, mac, dst):
                    if dst is None:
                        self.learned[device].discard(mac)
                    else:
                        self.fdb[device].discard(FdbEntry(mac=mac, dst=dst))
                case _:
                    raise AssertionError(f"unknown action {a}")
