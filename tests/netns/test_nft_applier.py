"""nftables: pure rendering, then NftApplier against real nft in a throwaway namespace."""

import json
import secrets
import subprocess

import pytest

from agent.nft import NftApplier, NftError, desired_digest, parse_observed, render

pytestmark = [pytest.mark.netns, pytest.mark.timeout(30)]


# --- pure -------------------------------------------------------------------------------------


def test_render_nothing_wanted():
    assert render([], None) == ""
    assert desired_digest([], None) is None


def test_render_text():
    digest = desired_digest(["10.1.0.0/24", "10.0.0.5/16"], "otwg0")
    assert digest is not None and digest.startswith("otherix:") and len(digest) == 24
    assert render(["10.1.0.0/24", "10.0.0.5/16"], "otwg0") == (
        "table inet otherix {}\n"
        "delete table inet otherix\n"
        "table inet otherix {\n"
        f'\tcomment "{digest}"\n'
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat;\n"
        f'\t\tip saddr 10.0.0.0/16 ip daddr != 10.0.0.0/16 masquerade comment "{digest}"\n'
        f'\t\tip saddr 10.1.0.0/24 ip daddr != 10.1.0.0/24 masquerade comment "{digest}"\n'
        "\t}\n"
        "\tchain input {\n"
        "\t\ttype filter hook input priority filter - 10;\n"
        f'\t\tudp dport 4789 iifname != "otwg0" drop comment "{digest}"\n'
        "\t}\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority filter - 10;\n"
        f'\t\tip daddr 10.0.0.0/16 ip saddr != 10.0.0.0/16 ct state established,related accept comment "{digest}"\n'
        f'\t\tip daddr 10.0.0.0/16 ip saddr != 10.0.0.0/16 drop comment "{digest}"\n'
        f'\t\tip daddr 10.1.0.0/24 ip saddr != 10.1.0.0/24 ct state established,related accept comment "{digest}"\n'
        f'\t\tip daddr 10.1.0.0/24 ip saddr != 10.1.0.0/24 drop comment "{digest}"\n'
        "\t}\n"
        "}\n"
    )


def test_render_is_deterministic_and_only_wanted_chains():
    assert render(["10.1.0.0/24", "10.2.0.0/24"], None) == render(
        ["10.2.0.0/24", "10.1.0.0/24"], None
    )
    assert "chain input" not in render(["10.1.0.0/24"], None)
    only_guard = render([], "otwg0", vxlan_port=8472)
    assert "chain postrouting" not in only_guard and "udp dport 8472" in only_guard
    assert "chain forward" not in only_guard  # isolation comes with NAT networks only
    assert desired_digest(["10.1.0.0/24"], None) != desired_digest(["10.1.0.0/24"], "otwg0")


@pytest.mark.parametrize(
    "subnets, via", [(["10.1.0.0/24; flush ruleset"], None), (["fd00::/64"], None), ([], 'x" drop')]
)
def test_render_rejects_bad_input(subnets, via):
    with pytest.raises(ValueError):
        render(subnets, via)


def test_parse_observed_uses_rule_comments_or_table_comment():
    rule = {"rule": {"family": "inet", "table": "otherix", "comment": "otherix:aa", "expr": []}}
    bare = {"rule": {"family": "inet", "table": "otherix", "expr": []}}
    table = {"table": {"family": "inet", "name": "otherix"}}
    assert parse_observed({"nftables": [table, rule, rule]}).digest == "otherix:aa"
    assert parse_observed({"nftables": [table, rule, bare]}).digest is None  # hand-added rule
    with_comment = {"table": {"name": "otherix", "comment": "otherix:bb"}}
    assert parse_observed({"nftables": [with_comment, bare]}).digest == "otherix:bb"


# --- real nft in a namespace ------------------------------------------------------------------


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


def rules_text(ns: str) -> str:
    return sh(ns, "nft", "list", "table", "inet", "otherix").stdout


async def test_apply_observe_noop_replace_remove(ns, nft):
    sh(ns, "nft", "add table ip other; add chain ip other c; add rule ip other c counter")
    assert (await nft.observe()).exists is False
    assert sh(ns, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "0"

    assert await nft.apply(["10.1.0.0/24"], "otwg0") == 2  # forwarding + table
    assert sh(ns, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    observed = await nft.observe()
    assert observed.exists and observed.rule_count == 4
    assert observed.digest == desired_digest(["10.1.0.0/24"], "otwg0")
    text = rules_text(ns)
    assert "ip saddr 10.1.0.0/24 ip daddr != 10.1.0.0/24 masquerade" in text
    assert 'udp dport 4789 iifname != "otwg0" drop' in text

    assert await nft.apply(["10.1.0.0/24"], "otwg0") == 0  # no-op heartbeat

    # replace: the old subnet is gone, the new one is in, atomically in one transaction
    assert await nft.apply(["10.2.0.0/24", "10.3.0.0/24"], None) == 1
    text = rules_text(ns)
    assert "10.1.0.0" not in text and "10.2.0.0/24" in text and "10.3.0.0/24" in text
    assert "chain input" not in text
    assert (await nft.observe()).rule_count == 6  # 2 masquerade + 2 x 2 isolation

    # a hand-deleted rule is noticed and repaired
    listing = json.loads(sh(ns, "nft", "-j", "-a", "list", "table", "inet", "otherix").stdout)
    handle = next(i["rule"]["handle"] for i in listing["nftables"] if "rule" in i)
    sh(ns, "nft", "delete", "rule", "inet", "otherix", "postrouting", "handle", str(handle))
    assert await nft.apply(["10.2.0.0/24", "10.3.0.0/24"], None) == 1
    assert (await nft.observe()).rule_count == 6

    # nothing wanted: our table goes, the foreign table stays
    assert await nft.apply([], None) == 1
    assert (await nft.observe()).exists is False
    assert await nft.apply([], None) == 0
    assert "counter" in sh(ns, "nft", "list", "table", "ip", "other").stdout


async def test_nft_error_is_clear(ns, nft):
    with pytest.raises(NftError, match=r"nft -f failed \(exit 1\): .*syntax error"):
        await nft._load("table inet otherix { bogus }\n")
    broken = NftApplier(nft="false", prefix=("ip", "netns", "exec", ns))
    with pytest.raises(NftError, match="exit 1"):
        await broken.observe()
