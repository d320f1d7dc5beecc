"""The drop counters as health reads them (``agent.nft.counters``: one netlink dump, no
process) against what ``nft -j list table`` shows, in a throwaway namespace with real traffic
dropped, a foreign table holding a counter of the same name, and no tables at all."""

import pytest

from agent.nft import counters
from agent.nft.rules import desired, spec
from tests.netns.test_nft_applier import apply, send_vxlan, sh
from tests.netns.test_nft_applier import nft as nft  # noqa: F401 (fixtures)
from tests.netns.test_nft_applier import ns as ns  # noqa: F401
from tests.unit.test_nft_rules import SNAP

pytestmark = [pytest.mark.netns, pytest.mark.timeout(30)]


async def test_the_counter_dump_equals_the_nft_listings(ns, nft):  # noqa: F811
    assert counters.read(ns) == {}  # no tables yet
    await apply(nft, desired(spec(SNAP)))
    sh(ns, "nft", "add table inet other; add counter inet other vxlan_guard packets 99 bytes 9")
    send_vxlan(ns, 3)
    listed = (await nft.observe()).counters
    assert listed["vxlan_guard"].packets == 3 and len(listed) >= 3
    assert counters.read(ns) == listed
    send_vxlan(ns, 2)
    assert (
        counters.read(ns)["vxlan_guard"].packets == 5 == (await nft.observe()).drops["vxlan_guard"]
    )
