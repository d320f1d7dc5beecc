"""An underlay MTU of 9000 gives 8940 on WireGuard and 8890 on every overlay device, taps included."""

import pytest

from lab.cluster import Lab
from tests.e2e.helpers import diagnose, lab_fixture, links, warm_up

pytestmark = [pytest.mark.netns, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

lab = lab_fixture(nodes=2, mesh=True, heartbeat=0.5, underlay_mtu=9000)


async def test_jumbo_underlay_derives_every_mtu(lab: Lab):
    api = await lab.connect()
    net = await api.network_create("jumbo", "overlay", "10.50.0.0/24")
    assert net.mtu == 8890
    local = await api.network_create("local", "bridge", "10.51.0.0/24")
    assert local.mtu == 9000
    await lab.vm_add("j1", "jumbo", "n1")
    b = await lab.vm_add("j2", "jumbo", "n2")
    await lab.vm_add("l1", "local", "n1")
    await lab.wait_converged()
    for node in ("n1", "n2"):
        devices = {n: v for n, v in (await links(lab, node)).items() if n.startswith("ot")}
        assert devices.pop("otwg0").startswith("mtu 8940")
        local_devices = {n for n, v in devices.items() if "otn" in v or n.startswith("otn")}
        for name, info in devices.items():
            want = "9000" if name in local_devices else "8890"
            assert info.startswith(f"mtu {want}"), (node, name, info)
    await warm_up(lab, ["j1", "j2"])  # a fresh mesh's first handshake may wait 5 s for its retry
    jumbo = await lab.ping("j1", b.ip, size=8890 - 28, dont_fragment=True, timeout=5)
    assert jumbo, f"no jumbo reply within 5 s (once in CI; cause unknown):\n{await diagnose(lab)}"
    assert not await lab.ping("j1", b.ip, size=8891 - 28, dont_fragment=True, timeout=1)
