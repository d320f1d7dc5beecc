"""agent.assemble against controller.sections over a faulty wire: HEADs and their deltas dropped,
duplicated and reordered, fetches failing. An agent assembles a state only when it is exactly
what the controller computed for that HEAD (never a mix), and one clean heartbeat repairs all."""

import asyncio
import random

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.assemble import Assembler, complete
from controller.compute import compute_snapshots
from controller.sections import Attachments, Model
from schemas.codec import decode, encode
from schemas.wire import Head, SectionData, SectionGet
from tests.unit.test_sections import CFG, NETWORKS, apply_op, content, mesh_node, ops

SETTINGS = settings(
    deadline=None, database=None, max_examples=60, suppress_health_check=list(HealthCheck)
)
NODES = ("n0", "n1", "n2")


class Wire:
    """The controller's side: a model, the expected state of every (node, version), and a
    ``section.get`` that may fail."""

    def __init__(self, budget: int):
        self.model, self.budget = Model(CFG), budget
        self.expected: dict[tuple[str, int], object] = {}
        self.fail_fetches = 0.0
        self.rng = random.Random(7)

    def change(self, intent, keys) -> dict[str, bytes]:
        """Sync and commit; the messages this heartbeat sends (with deltas for changed nodes)."""
        self.model.sync(intent, keys)
        done = self.model.commit()
        full = compute_snapshots(intent, CFG)
        for node, head in self.model.heads.items():
            key = (node, head.version)
            assert self.expected.setdefault(key, content(full[node])) == content(full[node])
        attach = Attachments(done)
        return {
            n: encode(self.model.head(n, self.budget, attach if n in done.nodes else None))
            for n in sorted(self.model.heads)
        }

    async def fetch(self, node: str, req: SectionGet) -> SectionData:
        if self.rng.random() < self.fail_fetches:
            raise TimeoutError("dropped")
        # through the codec both ways, as on the bus
        req = decode(encode(req), SectionGet)
        return decode(encode(self.model.get(node, req, self.budget)), SectionData)


class Agent:
    def __init__(self, node: str, wire: Wire):
        self.node, self.wire = node, wire
        self.assembler = Assembler(node)
        self.applied = 0
        self.snapshot = None

    async def receive(self, raw: bytes) -> None:
        head = decode(raw, Head)
        if head.node != self.node or head.version < self.applied:
            return  # another node's, or stale (the gate refuses it)
        try:
            snap = await complete(self.assembler, head, lambda r: self.wire.fetch(self.node, r))
        except TimeoutError:
            return  # acked as an error; the data plane keeps its state
        if snap is None:
            return
        # never a mix: exactly what the controller computed for this node at this version
        assert content(snap) == self.wire.expected[(self.node, head.version)]
        self.applied, self.snapshot = head.version, snap


def faulty(messages: list[bytes], held: list[bytes], rng: random.Random) -> list[bytes]:
    """Drop, duplicate and delay (deliver later, out of order) messages."""
    out = []
    for raw in messages:
        r = rng.random()
        if r < 0.25:
            continue
        if r < 0.4:
            held.append(raw)
            continue
        out.append(raw)
        if r < 0.55:
            out.append(raw)
    if held and rng.random() < 0.5:
        rng.shuffle(held)
        out += held
        held.clear()
    return out


async def run(steps, seed: int, budget: int) -> None:
    from schemas.intent import Intent

    intent, wire = Intent(), Wire(budget)
    for i, name in enumerate(NODES):
        intent.nodes[name] = mesh_node(i)
    agents = {n: Agent(n, wire) for n in NODES}
    rng, held = random.Random(seed), []
    wire.fail_fetches = 0.2
    wire.change(intent, None)
    for op in steps:
        for raw in faulty(list(wire.change(intent, [apply_op(intent, op)]).values()), held, rng):
            node = decode(raw, Head).node
            if node in agents:
                await agents[node].receive(raw)
    wire.fail_fetches = 0.0
    final = wire.change(intent, None)  # a clean heartbeat: nothing changed, refs only
    full = compute_snapshots(intent, CFG)
    for raw in final.values():
        node = decode(raw, Head).node
        if node in agents:
            await agents[node].receive(raw)
            assert content(agents[node].snapshot) == content(full[node])


node_ops = ops.filter(lambda steps: all(op[0][1] not in NODES for op in steps))


@SETTINGS
@given(node_ops, st.integers(0, 2**32))
def test_faulty_wire_never_mixes_and_one_clean_heartbeat_repairs(steps, seed):
    asyncio.run(run(steps, seed, budget=1 << 20))


@SETTINGS
@given(node_ops, st.integers(0, 2**32))
def test_the_same_with_a_tiny_budget_every_section_is_paged(steps, seed):
    asyncio.run(run(steps, seed, budget=300))


def test_a_delta_applies_only_to_the_version_it_was_made_from():
    from schemas.intent import Intent, Nic

    intent, wire = Intent(networks={"ov1": NETWORKS[2]}), Wire(1 << 20)
    intent.nodes.update({"n0": mesh_node(0), "n1": mesh_node(1)})
    wire.change(intent, None)
    agent = Agent("n0", wire)
    asyncio.run(agent.receive(wire.change(intent, None)["n0"]))
    assert agent.snapshot is not None
    mesh_v = agent.assembler.have("mesh")

    def attach(i):
        nic = Nic(id=f"{i:012x}" + "0" * 20, network="ov1", node="n1", vm="v", mac=f"02:00:00:00:00:{i:02x}", ip=f"10.1.0.{i + 1}")  # fmt: skip
        intent.nics[nic.id] = nic
        return wire.change(intent, [("nic", nic.id)])

    attach(1)  # dropped (n0 does not host ov1 yet: only n1's head changed anyway)
    intent.nics["0" * 11 + "9" + "0" * 20] = Nic(id="0" * 11 + "9" + "0" * 20, network="ov1", node="n0", vm="w", mac="02:00:00:00:00:99", ip="10.1.0.99")  # fmt: skip
    first = wire.change(intent, [("nic", "0" * 11 + "9" + "0" * 20)])
    second = attach(2)
    head2 = decode(second["n0"], Head)
    assert [d.name for d in head2.sections] == ["vni.1001"] and head2.sections[0].base
    # the second delta before the first: refused (wrong base), nothing held changes
    assert not agent.assembler.offer(head2.sections[0])
    assert agent.assembler.have("mesh") == mesh_v and "vni.1001" not in agent.assembler.held
    asyncio.run(agent.receive(first["n0"]))
    asyncio.run(agent.receive(second["n0"]))  # now it applies on top
    assert agent.applied == head2.version
    assert {e.mac for e in agent.snapshot.vxlans[0].fdb} >= {
        "02:00:00:00:00:01",
        "02:00:00:00:00:02",
    }


def test_a_forged_digest_is_never_held():
    intent_wire = Wire(1 << 20)
    from schemas.intent import Intent

    intent = Intent(nodes={"n0": mesh_node(0), "n1": mesh_node(1)})
    head = decode(intent_wire.change(intent, None)["n0"], Head)
    assembler = Assembler("n0")
    whole = head.sections[0]
    assert assembler.offer(whole)
    assembler = Assembler("n0")
    assert not assembler.offer(msgspec.structs.replace(whole, digest="0" * 32))
    assert assembler.held == {}


@pytest.mark.parametrize("schema", [2, 4])
def test_heads_of_another_schema_are_refused_by_the_gate(schema):
    from agent.validate import Rejected, accept_head

    raw = encode(Head(node="n1", version=3, digest="d", schema=schema))
    with pytest.raises(Rejected, match=f"snapshot schema {schema} is not supported"):
        accept_head(raw, "n1", 0)
