"""A fake kernel for the links subsystem: holds ``Observed`` state and executes actions like netlink.

It models what matters to the planner: kinds, MTUs, masters, up flags, addresses, FDB, and the
kernel's habit of deleting a device's ports' master link and FDB with it. Bridge ports get
learning on whenever enslaved; a bridge holds one entry per MAC (an add with replace moves it
between ports), and a port leaving its bridge loses its entries. A unicast VXLAN MAC has one
dst: ``AddFdb`` replaces it (``legacy_append`` models the old append, which the kernel ignores
for an existing unicast MAC). ``fail`` makes chosen
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
        self.port_fdb = {k: set(v) for k, v in observed.port_fdb.items()}
        self.port_learned = {k: set(v) for k, v in observed.port_learned.items()}
        self.legacy_append = False
        self.writes = 0
        self.fail: dict[tuple[str, str], int] = {}  # (action name, device) -> errno

    def observe_now(self) -> m.Observed:
        return m.Observed(
            links=dict(self.links),
            fdb={k: frozenset(v) for k, v in self.fdb.items()},
            learned={k: frozenset(v) for k, v in self.learned.items()},
            port_fdb={k: frozenset(v) for k, v in self.port_fdb.items() if k in self.links},
            port_learned={k: frozenset(v) for k, v in self.port_learned.items() if k in self.links},
        )

    def _release(self, port: str) -> None:
        """Off its bridge: the bridge forgets its entries on the port, learning is moot."""
        self.port_fdb.pop(port, None)
        self.port_learned.pop(port, None)
        if port in self.links:
            self._set(port, master=None, port_learning=None)

    def bridge_entries(self, bridge: str) -> dict[str, str]:
        """mac -> port of every static and learned entry of a bridge."""
        out = {}
        for port, link in self.links.items():
            if link.master == bridge:
                for mac in self.port_fdb.get(port, set()) | self.port_learned.get(port, set()):
                    assert mac not in out, f"{mac} twice on {bridge}"
                    out[mac] = port
        return out

    def _set(self, name: str, **changes) -> None:
        self.links[name] = msgspec.structs.replace(self.links[name], **changes)

    # --- the LinkKernel seam ------------------------------------------------------------------

    async def observe(self) -> m.Observed:
        return self.observe_now()

    async def observe_link(self, name: str) -> m.Link | None:
        return self.links.get(name)

    async def observe_devices(self, names) -> m.Observed:
        now, names = self.observe_now(), set(names)
        return m.Observed(
            links={k: v for k, v in now.links.items() if k in names},
            port_fdb={k: v for k, v in now.port_fdb.items() if k in names},
            port_learned={k: v for k, v in now.port_learned.items() if k in names},
        )

    async def execute(self, plan: m.LinkPlan) -> ApplyResult[frozenset[str]]:
        done, errors = 0, []
        for a in plan.actions:
            device = (
                a.device
                if isinstance(a, m.AddFdb | m.DelFdb)
                else a.port
                if isinstance(a, m.AddPortFdb | m.DelPortFdb)
                else a.name
            )
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
                    if self.links[name].master != master:
                        self._release(name)
                    if master is not None:
                        self._set(name, master=master, port_learning=True)
                case m.SetPortLearning(name, learning):
                    assert self.links[name].master is not None, f"{name} is no bridge port"
                    self._set(name, port_learning=learning)
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
                    self.port_fdb.pop(name, None)
                    self.port_learned.pop(name, None)
                    for other in list(self.links.values()):
                        if other.master == name:
                            self._release(other.name)
                case m.AddFdb(device, mac, dst):
                    entries = self.fdb[device]
                    same_mac = {e for e in entries if e.mac == mac}
                    if mac != "00:00:00:00:00:00" and same_mac:
                        if self.legacy_append:
                            continue  # NLM_F_APPEND on an existing unicast MAC: ignored
                        entries -= same_mac  # NLM_F_REPLACE: the one dst changes in place
                    entries.add(FdbEntry(mac=mac, dst=dst))
                case m.AddPortFdb(port, mac):
                    bridge = self.links[port].master
                    assert bridge is not None, f"{port} is no bridge port"
                    for other in self.links.values():  # replace: moves it within the bridge
                        if other.master == bridge:
                            self.port_fdb.get(other.name, set()).discard(mac)
                            self.port_learned.get(other.name, set()).discard(mac)
                    self.port_fdb.setdefault(port, set()).add(mac)
                case m.DelPortFdb(port, mac):
                    self.links[port]  # ENODEV like netlink
                    self.port_fdb.get(port, set()).discard(mac)
                    self.port_learned.get(port, set()).discard(mac)
                case m.DelFdb(device, mac, dst):
                    if dst is None:
                        self.learned[device].discard(mac)
                    else:
                        self.fdb[device].discard(FdbEntry(mac=mac, dst=dst))
                case _:
                    raise AssertionError(f"unknown action {a}")
