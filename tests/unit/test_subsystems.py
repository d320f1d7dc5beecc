"""The observe → plan → apply contract against fake kernels, per subsystem and through the agent.

Felix's pattern: seed a fake kernel, reconcile, then show that a second resync plans nothing;
make one action fail and show a typed ``ApplyError`` whose ``temporary`` flag tells a retry from
a refusal. (WireGuard's fake is in ``test_wireguard_kernel_fake.py``.)
"""

import errno
import json
import logging

import msgspec
import pytest

from agent.assemble import head_for
from agent.errors import ApplyError
from agent.links import model as m
from agent.links.applier import LinkApplier
from agent.nft.applier import NftApplier
from agent.nft.rules import NftSpec
from agent.nft.rules import desired as nft_desired
from agent.runner import Agent, AgentConfig
from schemas.codec import decode, encode
from schemas.desired import Bridge, FdbEntry, Snapshot, Tap, Vxlan, WireGuard
from schemas.messages import Ack
from tests.unit.fake_kernel import FakeKernel

pytestmark = pytest.mark.timeout(20)

BR, TAP, VX = "otb1000", "ot0123456789ab", "otvx1000"
SNAP = Snapshot(
    node="n1",
    version=5,
    bridges=(Bridge(name=BR, mtu=1390, address="10.1.0.1/24"),),
    taps=(Tap(name=TAP, bridge=BR, mtu=1390),),
    vxlans=(
        Vxlan(
            name=VX,
            vni=1000,
            bridge=BR,
            local="100.64.0.1",
            mtu=1390,
            fdb=(FdbEntry(mac="00:00:00:00:00:00", dst="100.64.0.2"),),
        ),
    ),
    nat_subnets=("10.1.0.0/24",),
)


class FakeNft(NftApplier):
    """``nft`` and ``sysctl`` answered from memory: the table's rules (with their comments)."""

    def __init__(self):
        super().__init__(prefix=("fake",))
        self.rules: list[dict] | None = None  # None: no table
        self.objects: list[tuple[str, dict]] = []  # sets and counters
        self.forwarding = "0"
        self.runs: list[str] = []
        self.fail_load = False

    async def _run(self, argv, stdin=None):
        self.runs.append(" ".join(argv[:2]))
        match argv:
            case ["nft", "-j", "list", "table", family, _]:
                items = [{k: v} for k, v in self.objects + [("rule", r) for r in self.rules or ()]
                         if v["family"] == family]  # fmt: skip
                if not items:
                    return 1, "", "Error: No such file or directory"
                return 0, json.dumps({"nftables": items}), ""
            case ["nft", "-j", "-f", "-"]:
                if self.fail_load:
                    return 1, "", "Error: Could not process rule: Device or resource busy"
                adds = [
                    next(iter(c["add"].items()))
                    for c in json.loads(stdin)["nftables"]
                    if "add" in c
                ]
                self.rules = [v for k, v in adds if k == "rule"] or None
                self.objects = [(k, v) for k, v in adds if k in ("set", "counter") and self.rules]
                return 0, "", ""
            case ["sysctl", "-n", _]:
                return 0, self.forwarding + "\n", ""
            case ["sysctl", "-qw", setting]:
                self.forwarding = setting.rpartition("=")[2]
                return 0, "", ""
        raise AssertionError(argv)


# --- links --------------------------------------------------------------------------------------


async def test_links_second_reconcile_plans_nothing():
    links = LinkApplier(FakeKernel())
    result = await links.reconcile(SNAP)
    assert result.errors == () and result.writes > 0 and result.reached == {BR, TAP, VX}
    assert links.plan(SNAP, await links.observe()).actions == ()
    assert (await links.reconcile(SNAP)).writes == 0


@pytest.mark.parametrize(
    ("code", "temporary"), [(errno.EBUSY, True), (errno.ENODEV, True), (errno.EINVAL, False)]
)
async def test_links_failed_action_is_a_typed_error_and_the_rest_is_applied(code, temporary):
    kernel = FakeKernel()
    kernel.fail[("CreateTap", TAP)] = code
    links = LinkApplier(kernel)
    result = await links.reconcile(SNAP)
    (error,) = [e for e in result.errors if e.op == "CreateTap"]
    assert (error.device, error.errno, error.temporary) == (TAP, code, temporary)
    assert result.reached == {BR, VX}  # the failed create is not counted as a device
    assert kernel.fdb[VX] == set(SNAP.vxlans[0].fdb)  # the others went on
    del kernel.fail[("CreateTap", TAP)]
    assert (await links.reconcile(SNAP)).errors == ()
    assert links.plan(SNAP, await links.observe()).actions == ()


# --- nftables -----------------------------------------------------------------------------------


async def test_nft_second_reconcile_plans_nothing():
    nft = FakeNft()
    want = nft.desired(SNAP)
    result = await nft.reconcile(want)
    assert result.errors == () and result.writes == 2  # forwarding + table
    assert result.reached.digest == want.digest and nft.forwarding == "1"
    assert len(nft.rules) == want.rule_count == 27
    assert nft.plan(want, await nft.observe()).writes == 0
    assert (await nft.reconcile(want)).writes == 0
    assert (await nft.reconcile(nft_desired(NftSpec()))).writes == 1 and nft.rules is None


async def test_nft_failed_load_is_a_typed_refusal():
    nft = FakeNft()
    nft.fail_load = True
    result = await nft.reconcile(nft.desired(SNAP))
    assert result.writes == 1  # forwarding still went on
    (error,) = result.errors
    assert (error.op, error.temporary) == ("load", False) and "Device or resource busy" in str(
        error
    )
    assert not result.reached.exists


# --- the agent: a loop over the subsystems -------------------------------------------------------


class FakeNats:
    def __init__(self):
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, data: bytes) -> None:
        self.published.append((subject, data))


# The agent's gate (agent.validate) refuses FDB entries without a WireGuard mesh to carry them,
# and these agents run without WireGuard.
# what the snapshot gate lets through: no FDB without a mesh, no gateway (nor NAT) on an overlay
AGENT_SNAP = msgspec.structs.replace(
    SNAP,
    bridges=(Bridge(name=BR, mtu=1390),),
    nat_subnets=(),
    vxlans=(msgspec.structs.replace(SNAP.vxlans[0], fdb=()),),
)


def make_agent(tmp_path, kernel: FakeKernel, nft: FakeNft) -> Agent:
    config = AgentConfig(node="n1", state_dir=tmp_path)
    return Agent(FakeNats(), config, LinkApplier(kernel), nft)  # type: ignore[arg-type]


async def test_agent_acks_typed_errors_as_text_and_counts_only_devices_that_exist(tmp_path):
    kernel, nft = FakeKernel(), FakeNft()
    kernel.fail[("CreateTap", TAP)] = errno.EBUSY
    agent = make_agent(tmp_path, kernel, nft)
    ack = await agent.handle(encode(head_for(AGENT_SNAP)))
    assert not ack.ok and ack.applied_version == 0
    assert ack.error == (  # readable text, built from the typed errors at the edge
        f"version 5: CreateTap {TAP}: Device or resource busy; "
        f"SetMaster {TAP}: device {TAP} not found; "
        f"SetPortLearning {TAP}: device {TAP} not found; SetUp {TAP}: device {TAP} not found"
    )
    assert (await agent.health()).devices == 2  # bridge and VXLAN; the tap failed
    assert decode(agent.nc.published[-1][1], Ack) == ack

    del kernel.fail[("CreateTap", TAP)]
    ack = await agent.handle(encode(head_for(AGENT_SNAP)))
    assert ack.ok and ack.error is None and ack.applied_version == 5 and ack.changes > 0
    assert (await agent.health()).devices == 3
    writes, runs = kernel.writes, len(nft.runs)
    ack = await agent.handle(encode(head_for(AGENT_SNAP)))  # the no-op heartbeat
    assert ack.ok and ack.changes == 0 and kernel.writes == writes
    assert [r for r in nft.runs[runs:] if r != "nft -j" and r != "sysctl -n"] == []


async def test_agent_logs_a_failure_once_then_in_sync_once(tmp_path, caplog):
    kernel = FakeKernel()
    kernel.fail[("CreateTap", TAP)] = errno.EBUSY
    agent = make_agent(tmp_path, kernel, FakeNft())
    with caplog.at_level(logging.INFO, logger="agent"):
        for _ in range(3):
            await agent.handle(encode(head_for(AGENT_SNAP)))
        del kernel.fail[("CreateTap", TAP)]
        for _ in range(3):
            await agent.handle(encode(head_for(AGENT_SNAP)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [  # four kinds (the tap's create, then its master, learning, up), once
        f"node n1: CreateTap failed (temporary): CreateTap {TAP}: Device or resource busy; "
        "repeats are counted, not logged",
        f"node n1: SetMaster failed (temporary): SetMaster {TAP}: device {TAP} not found; "
        "repeats are counted, not logged",
        f"node n1: SetPortLearning failed (temporary): SetPortLearning {TAP}: device {TAP} "
        "not found; repeats are counted, not logged",
        f"node n1: SetUp failed (temporary): SetUp {TAP}: device {TAP} not found; "
        "repeats are counted, not logged",
    ]
    in_sync = [r.getMessage() for r in caplog.records if "in sync again" in r.getMessage()]
    assert in_sync == [
        "node n1: in sync again after 3 failing heartbeat(s), 12 failure(s) of 4 kind(s)"
    ]


async def test_agent_without_the_mesh_refuses_a_wireguard_snapshot(tmp_path):
    snap = Snapshot(
        node="n1",
        version=1,
        wireguard=WireGuard(name="otwg0", address="100.64.0.1/24", listen_port=51820, mtu=1440),
    )
    agent = make_agent(tmp_path, FakeKernel(), FakeNft())
    ack = await agent.handle(encode(head_for(snap)))
    assert not ack.ok
    assert ack.error == (
        "version 1: mesh otwg0: snapshot asks for the WireGuard mesh but this agent runs without it"
    )
    assert agent.tunnel_address == "100.64.0.1"


def test_apply_error_equality_and_kind():
    a = ApplyError("otb1", "SetUp", "Device or resource busy", errno=errno.EBUSY)
    assert a == ApplyError.from_errno("otb1", "SetUp", errno.EBUSY) and a.temporary
    assert (
        a.kind == ("SetUp", "otb1", errno.EBUSY) and str(a) == "SetUp otb1: Device or resource busy"
    )
    assert not ApplyError("otb1", "SetUp", "x", errno=errno.EPERM).temporary
    assert isinstance(m.Link(name="ot1", kind="", mtu=1, up=True).index, int)
