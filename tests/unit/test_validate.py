"""The agent's snapshot gate (``agent.validate``): what it accepts, and every refusal with its
reason. API request validation is tested where the API answers (tests/integration/test_api.py)."""

import msgspec
import pytest

from agent.validate import Rejected, accept
from schemas.codec import decode, encode
from schemas.desired import SNAPSHOT_SCHEMA, Bridge, FdbEntry, Snapshot, Tap, Vxlan
from schemas.messages import Ack, Health

GOOD = Snapshot(
    node="n1",
    version=5,
    bridges=(Bridge(name="otb1000", mtu=1390),),
    taps=(Tap(name="ot0123456789ab", bridge="otb1000", mtu=1390),),
    vxlans=(
        Vxlan(
            name="otvx1000",
            vni=1000,
            bridge="otb1000",
            local="100.64.0.1",
            mtu=1390,
            fdb=(FdbEntry(mac="00:00:00:00:00:00", dst="100.64.0.2"),),
        ),
    ),
)


def raw(**changes):
    return encode(msgspec.structs.replace(GOOD, **changes))


def test_good_snapshot_accepted_same_or_newer_version():
    assert accept(raw(), "n1", applied_version=5) == GOOD
    assert accept(raw(), "n1", applied_version=0) == GOOD


@pytest.mark.parametrize(
    ("data", "node", "applied", "message"),
    [
        (b"{not json", "n1", 0, "malformed snapshot"),
        (b'{"node": "n1"}', "n1", 0, "malformed snapshot: Object missing required field `version`"),
        (b'{"node": "n1", "version": "7"}', "n1", 0, "Expected `int`, got `str` - at `$.version`"),
        (raw(schema=1), "n1", 0, "schema 1 is not supported"),  # an older controller's
        (raw(schema=3), "n1", 0, "schema 3 is not supported"),
        (raw(), "n2", 0, "snapshot is for node 'n1', this is 'n2'"),
        (raw(), "n1", 6, "stale snapshot: version 5 is older than applied version 6"),
        (
            raw(bridges=(Bridge(name="eth0", mtu=1500),), taps=(), vxlans=()),
            "n1",
            0,
            "'eth0' is not an Otherix device name",
        ),
        (raw(bridges=(Bridge(name="otb1000", mtu=10),)), "n1", 0, "MTU 10 out of range"),
        (raw(bridges=()), "n1", 0, "bridge otb1000, which the snapshot does not define"),
        (
            raw(bridges=(Bridge(name="otb1000", mtu=1390, address="10.0.0.300/24"),)),
            "n1",
            0,
            "10.0.0.300",
        ),
        (raw(nat_subnets=("10.0.0.1/24",)), "n1", 0, "has host bits set"),
        (
            raw(bridges=(Bridge(name="otb1000", mtu=1390), Bridge(name="otb1000", mtu=1390))),
            "n1",
            0,
            "appears twice",
        ),
        (
            raw(bridges=(Bridge(name="ot;rm -rf", mtu=1390),), taps=(), vxlans=()),
            "n1",
            0,
            "not an Otherix device name",
        ),
        (
            raw(
                vxlans=(
                    msgspec.structs.replace(
                        GOOD.vxlans[0], fdb=(FdbEntry(mac="02:zz:00:00:00:01", dst="100.64.0.2"),)
                    ),
                )
            ),
            "n1",
            0,
            "FDB MAC '02:zz:00:00:00:01'",
        ),
    ],
)
def test_refused_with_reason(data, node, applied, message):
    with pytest.raises(Rejected) as e:
        accept(data, node, applied)
    assert message in str(e.value)


def test_unknown_fields_are_tolerated_for_rolling_upgrades():
    data = encode(GOOD)[:-1] + b',"future_field":{"x":1}}'
    assert accept(data, "n1", 0) == GOOD


def test_message_round_trips():
    ack = Ack(node="n1", version=3, applied_version=3, digest="ab", changes=2)
    health = Health(node="n1", applied_version=3, ok=True, started_at=1.0, sent_at=2.0)
    assert decode(encode(ack), Ack) == ack
    assert decode(encode(health), Health) == health
    assert decode(encode(GOOD), Snapshot) == GOOD
    assert ack.schema == health.schema == 1 and GOOD.schema == SNAPSHOT_SCHEMA == 2
