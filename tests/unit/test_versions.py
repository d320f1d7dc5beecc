"""controller.versions: generations continue above everything issued, the mark is written once per
block, and a node's report of a version we never issued moves it above that."""

from controller.versions import BLOCK, continue_above, reservation, start_generation
from schemas import MAX_VERSION
from schemas.intent import NodeVersion


def test_start_continues_above_the_mark_and_an_older_releases_node_versions():
    assert start_generation(0) == 0
    assert start_generation(2048) == 2048
    old = [NodeVersion(node="n1", version=5000, digest="x"), NodeVersion(node="n2", version=3, digest="y")]  # fmt: skip
    assert start_generation(2048, old) == 5000


def test_one_write_per_block_of_generations():
    writes, reserved = 0, 0
    for generation in range(1, 3 * BLOCK + 1):
        mark = reservation(generation, reserved)
        if mark is not None:
            assert mark >= generation
            reserved, writes = mark, writes + 1
        assert generation <= reserved  # nothing is ever sent above the persisted mark
    assert writes == 3


def test_the_mark_never_passes_the_bound():
    assert reservation(MAX_VERSION - 1, 0) == MAX_VERSION


def test_continue_above_only_when_the_node_is_ahead_and_room_is_left():
    assert continue_above(7, 500)
    assert not continue_above(7, 7) and not continue_above(7, 3)
    assert not continue_above(0, MAX_VERSION)
    assert continue_above(0, MAX_VERSION - 1)
