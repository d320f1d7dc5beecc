"""Small builders for intent used by the pure tests."""

from schemas.intent import Egress, Intent, Network, NetworkType, Nic, Node

KEYS = {
    "n1": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    "n2": "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=",
    "n3": "QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8=",
}


def node(name, mesh=True, index=1):
    if not mesh:
        return Node(name=name)
    return Node(
        name=name,
        underlay_ip=f"198.18.0.{10 + index}",
        wg_public_key=KEYS[name],
        wg_listen_port=51820,
        tunnel_ip=f"100.64.0.{index}",
    )


def nic(i, network, node_name, mac=None):
    return Nic(
        id=f"{i:012x}" + "f" * 20,
        network=network,
        node=node_name,
        vm=f"vm{i}",
        mac=mac or f"02:00:00:00:00:{i:02x}",
        ip=f"10.0.0.{i + 1}",
    )


def bridge_net(name="lan", nat=False, subnet="10.0.0.0/24"):
    return Network(
        name=name,
        type=NetworkType.BRIDGE,
        subnet=subnet,
        gateway=subnet.rsplit(".", 1)[0] + ".1",
        egress=Egress.NAT if nat else Egress.NONE,
    )


def overlay_net(name="ov", vni=1000, subnet="10.1.0.0/24"):
    return Network(name=name, type=NetworkType.OVERLAY, subnet=subnet, gateway="10.1.0.1", vni=vni)


def intent(networks=(), nics=(), nodes=()):
    return Intent(
        networks={n.name: n for n in networks},
        nics={n.id: n for n in nics},
        nodes={n.name: n for n in nodes},
    )
