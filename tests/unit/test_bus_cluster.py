"""Rendering a cluster of servers: refused rosters, the ``--server`` syntax, and what each
server's configuration says (pure: no server runs here; tests/integration/test_nats_cluster.py
starts them)."""

import argparse

import msgspec
import pytest

from client.bus import cli, pki
from client.bus.permissions import ClusterServer, Roster, render_cluster_conf, validate


def _roster(servers, **kw) -> Roster:
    keys = {r: pki.public_key(pki.new_user_seed()) for r in ("controller", "admin", "viewer")}
    return Roster(server_dir="/etc/otherix-bus", store_dir="/data", servers=servers, **keys, **kw)


THREE = tuple(ClusterServer(name=f"nats{i}", host=f"nats{i}") for i in (1, 2, 3))


@pytest.mark.parametrize(
    "servers, why",
    [
        (THREE[:2], "at least 3"),
        ((*THREE[:2], ClusterServer(name="nats1", host="other")), "share one name"),
        ((*THREE[:2], ClusterServer(name="nats3", host="nats2")), "share an address"),
        ((*THREE[:2], ClusterServer(name="bad name", host="x")), "server name"),
        ((*THREE[:2], ClusterServer(name="nats3", host="x", route_port=0)), "ports"),
    ],
)
def test_a_bad_cluster_is_refused(servers, why):
    with pytest.raises(ValueError, match=why):
        validate(_roster(servers))


def test_each_server_listens_on_its_ports_and_routes_to_the_others_only():
    roster = _roster(THREE, cluster="prod")
    text = render_cluster_conf(roster, "nats2", "s3cret")
    assert 'server_name: "nats2"' in text and 'name: "prod"' in text
    assert 'store_dir: "/data/nats2"' in text and "sync_interval: always" in text
    assert '"nats-route://route:s3cret@nats1:6222", "nats-route://route:s3cret@nats3:6222"' in text
    assert 'password: "s3cret"' in text and "no_advertise: true" in text
    assert 'ca_file: "/etc/otherix-bus/ca.pem"' in text
    with pytest.raises(ValueError, match="no server"):
        render_cluster_conf(roster, "nats9", "s3cret")
    assert roster.urls() == ("nats://nats1:4222", "nats://nats2:4222", "nats://nats3:4222")
    # the roster (not secret) round-trips with its servers
    assert msgspec.json.decode(msgspec.json.encode(roster), type=Roster) == roster


@pytest.mark.parametrize(
    "value, expected",
    [
        ("a=h", ("a", "h", 4222, 6222)),
        ("a=10.0.0.1:5222", ("a", "10.0.0.1", 5222, 6222)),
        ("a=h:1:2", ("a", "h", 1, 2)),
        ("a=[2001:db8::1]:4222", ("a", "2001:db8::1", 4222, 6222)),
    ],
)
def test_server_flag(value, expected):
    s = cli._server(value)
    assert (s.name, s.host, s.port, s.route_port) == expected


@pytest.mark.parametrize("value", ["h", "a=", "=h", "a=h:x", "a=h:1:2:3"])
def test_server_flag_refuses(value):
    with pytest.raises(argparse.ArgumentTypeError):
        cli._server(value)


def test_the_server_certificate_serves_routes_too(tmp_path):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca, key = pki.new_ca()
    cert, _ = pki.new_server_cert(ca, key, ("nats1",))
    usages = (
        x509.load_pem_x509_certificate(cert)
        .extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        .value
    )
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
