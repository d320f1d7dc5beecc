"""The nftables subsystem (``NftApplier``) against real nft in a throwaway namespace (the pure
rules are tested in ``tests/unit/test_nft_rules.py``)."""

import json
import secrets
import subprocess

import msgspec
import pytest

from agent.errors import NftError
from agent.nft.applier import NftApplier
from agent.nft.rules import desired, desired_digest

pytestmark = [pytest.mark.netns, pytest.mark.timeout(30)]


def sh(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], check=check, capture_output=True, text=True, timeout=10
    )


@pytest.fixture
def ns():
    name = "otnl-" + secrets.token_hex(4)
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


@pytest.fixture
def nft(ns):
    return NftApplier(prefix=("ip", "netns", "exec", ns))


async def apply(nft: NftApplier, subnets: list[str], via: str | None) -> int:
    """One heartbeat's nft step (observe → plan → apply); its writes."""
    result = await nft.reconcile(desired(subnets, via))
    assert result.errors == (), result.errors
    return result.writes


def rules_text(ns: str) -> str:
    return sh(ns, "nft", "list", "table", "inet", "otherix").stdout


async def test_apply_observe_noop_replace_remove(ns, nft):
    sh(ns, "nft", "add table ip other; add chain ip other c; add rule ip other c counter")
    assert (await nft.observe()).exists is False
    assert sh(ns, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"

    assert await apply(nft, ["10.1.0.0/24"], "otwg0") == 2  # forwarding + table
    assert sh(ns, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    observed = await nft.observe()
    assert observed.exists and observed.rule_count == 4
    assert observed.digest == desired_digest(["10.1.0.0/24"], "otwg0")
    text = rules_text(ns)
    assert "ip saddr 10.1.0.0/24 ip daddr != 10.1.0.0/24 masquerade" in text
    assert 'udp dport 4789 iifname != "otwg0" drop' in text

    assert await apply(nft, ["10.1.0.0/24"], "otwg0") == 0  # no-op heartbeat

    # replace: the old subnet is gone, the new one is in, atomically in one transaction
    assert await apply(nft, ["10.2.0.0/24", "10.3.0.0/24"], None) == 1
    text = rules_text(ns)
    assert "10.1.0.0" not in text and "10.2.0.0/24" in text and "10.3.0.0/24" in text
    assert "chain input" not in text
    assert (await nft.observe()).rule_count == 6  # 2 masquerade + 2 x 2 isolation

    # a hand-deleted rule is noticed and repaired
    listing = json.loads(sh(ns, "nft", "-j", "-a", "list", "table", "inet", "otherix").stdout)
    handle = next(i["rule"]["handle"] for i in listing["nftables"] if "rule" in i)
    sh(ns, "nft", "delete", "rule", "inet", "otherix", "postrouting", "handle", str(handle))
    assert await apply(nft, ["10.2.0.0/24", "10.3.0.0/24"], None) == 1
    assert (await nft.observe()).rule_count == 6

    # nothing wanted: our table goes, the foreign table stays
    assert await apply(nft, [], None) == 1
    assert (await nft.observe()).exists is False
    assert await apply(nft, [], None) == 0
    assert "counter" in sh(ns, "nft", "list", "table", "ip", "other").stdout


async def test_nft_error_is_clear(ns, nft):
    with pytest.raises(NftError, match=r"nft -f failed \(exit 1\): .*syntax error") as info:
        await nft.load("table inet otherix { bogus }\n")
    assert info.value.op == "load" and not info.value.temporary
    broken = NftApplier(nft="false", prefix=("ip", "netns", "exec", ns))
    with pytest.raises(NftError, match="exit 1"):
        await broken.observe()


async def test_a_failed_load_is_a_typed_error_and_the_old_table_stays(ns, nft):
    assert await apply(nft, ["10.1.0.0/24"], None) == 2
    plan = nft.plan(desired(["10.2.0.0/24"], None), await nft.observe())
    plan = msgspec.structs.replace(plan, load="table inet otherix { bogus }\n")
    result = await nft.apply(plan)
    assert result.writes == 0 and len(result.errors) == 1
    assert isinstance(result.errors[0], NftError) and not result.errors[0].temporary
    assert result.reached.digest == desired_digest(["10.1.0.0/24"], None)
    assert "10.1.0.0/24" in rules_text(ns)
