"""controller.versions: a node's version grows only when its content does, and continues above a
version a node reports having applied that this controller never issued."""

import msgspec
import pytest

from controller.compute import ClusterConfig, compute_snapshots
from controller.versions import VersionExhausted, continue_above, stamp
from schemas import MAX_VERSION
from schemas.intent import NodeVersion
from tests.unit.factories import bridge_net, intent, nic, node

CFG = ClusterConfig()


def snapshots(*nics):
    return compute_snapshots(
        intent([bridge_net()], list(nics), [node("n1", False), node("n2", False)]), CFG
    )


def test_first_stamp_is_version_one():
    snap = snapshots()["n1"]
    assert stamp(None, snap) == NodeVersion(node="n1", version=1, digest=snap.digest)


def test_same_content_keeps_the_very_version():
    v1 = stamp(None, snapshots()["n1"])
    republished = msgspec.structs.replace(snapshots()["n1"], version=9, published_at=5.0)
    assert stamp(v1, republished) is v1


def test_changed_content_goes_one_up_and_never_back():
    empty, one = snapshots()["n1"], snapshots(nic(1, "lan", "n1"))["n1"]
    v1 = stamp(None, empty)
    v2 = stamp(v1, one)
    assert (v2.version, v2.digest) == (2, one.digest)
    v3 = stamp(v2, empty)  # the old content again: still upwards
    assert (v3.version, v3.digest) == (3, empty.digest)


def test_no_version_above_the_bound():
    changed = snapshots(nic(1, "lan", "n1"))["n1"]
    last = NodeVersion(node="n1", version=MAX_VERSION, digest="old")
    with pytest.raises(VersionExhausted, match="n1: version 9223372036854775807 is the maximum"):
        stamp(last, changed)
    below = NodeVersion(node="n1", version=MAX_VERSION - 1, digest="old")
    assert stamp(below, changed).version == MAX_VERSION


def test_continue_above_leaves_room_for_the_next_stamp():
    assert continue_above(None, "n1", MAX_VERSION) is None
    assert continue_above(None, "n1", MAX_VERSION - 1).version == MAX_VERSION - 1


def test_continue_above_only_when_the_node_is_ahead():
    ours = NodeVersion(node="n1", version=7, digest="abc")
    assert continue_above(ours, "n1", 7) is None
    assert continue_above(ours, "n1", 3) is None
    assert continue_above(None, "n1", 0) is None
    assert continue_above(None, "n1", 4) == NodeVersion(node="n1", version=4, digest="")


def test_after_continuing_the_same_content_goes_one_above_the_node():
    snap = snapshots()["n1"]
    ours = stamp(None, snap)
    continued = continue_above(ours, "n1", 500)
    nxt = stamp(continued, snap)
    assert (nxt.version, nxt.digest) == (501, snap.digest)
