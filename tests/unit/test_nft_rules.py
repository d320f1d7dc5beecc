"""nftables rules, pure: rendering, digest, parsing ``nft -j`` output, and the plan."""

import pytest

from agent.nft.rules import DROP, NftObserved, desired, desired_digest, parse_observed, plan, render


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


def test_plan_noop_replace_drop_and_forwarding():
    want = desired(["10.1.0.0/24"], "otwg0")
    in_place = NftObserved(exists=True, digest=want.digest, rule_count=4, forwarding=True)
    assert want.rule_count == 4 and plan(want, in_place).writes == 0  # second resync: nothing
    assert plan(want, NftObserved(exists=False, digest=None, rule_count=0)).load == want.script
    hand_edited = NftObserved(exists=True, digest=want.digest, rule_count=3, forwarding=True)
    assert plan(want, hand_edited).load == want.script
    off = NftObserved(exists=True, digest=want.digest, rule_count=4, forwarding=False)
    assert plan(want, off).enable_forwarding and plan(want, off).load is None
    nothing = desired([], None)
    assert plan(nothing, in_place).load == DROP and plan(nothing, in_place).digest is None
    assert plan(nothing, NftObserved(exists=False, digest=None, rule_count=0)).writes == 0
    # the guard alone needs no forwarding
    assert not plan(desired([], "otwg0"), off).enable_forwarding
