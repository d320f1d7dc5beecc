"""The 3-server configuration ``otherix-bus init --server …`` renders forms a real cluster whose
routes are authenticated: the three servers route to each other and hold the intent bucket in
three replicas, while a fourth server missing the route password, the route TLS, or holding a
certificate from another CA never joins (a correctly configured fourth server does, so the check
can tell). Clients still need their identity on every server.
"""

import asyncio
import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import nats
import pytest

from client.bus import files as bus_files
from client.bus import pki
from client.bus.permissions import ClusterServer
from controller.store import Store
from schemas.bus import connect_kwargs
from tests.conftest import free_port, nats_server_binary, stop_server, wait_listening

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]


class Cluster:
    """Three nats-servers on loopback from one bus directory, each with a monitoring port."""

    def __init__(self, root: Path, count: int = 3):
        self.root = root
        self.servers = tuple(
            ClusterServer(name=f"s{i}", host="127.0.0.1", port=free_port(), route_port=free_port())
            for i in range(1, count + 1)
        )
        self.bus = root / "bus"
        bus_files.init(self.bus, store_dir="", servers=self.servers, bind="127.0.0.1")
        self.monitor = {s.name: free_port() for s in self.servers}
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self, name: str, conf: Path, port: int, monitor: int) -> None:
        store = self.root / f"store-{name}"
        log = self.root / f"{name}.log"
        cmd = [nats_server_binary(), "-c", str(conf), "-js", "-sd", str(store), "-m", str(monitor)]
        with open(log, "ab") as out:
            self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        wait_listening(self.procs[name], port, log, 10)

    def start_all(self) -> None:
        for s in self.servers:
            conf = bus_files.server_conf_file(self.bus, s.name)
            self.start(s.name, conf, s.port, self.monitor[s.name])

    def stop_all(self) -> None:
        for proc in self.procs.values():
            stop_server(proc)

    def kwargs(self, identity: str) -> dict:
        return bus_files.identity_kwargs(self.bus, identity)


def routed_to(monitor_port: int) -> set[str]:
    """Names of the servers this one has a route with (its /routez)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/routez", timeout=2) as r:
        routes = json.load(r).get("routes") or []
    return {route.get("remote_name") or route.get("remote_id") for route in routes}


async def wait_routes(monitor_port: int, expected: set[str], timeout: float = 20.0) -> set[str]:
    deadline = time.monotonic() + timeout
    while True:
        seen = routed_to(monitor_port)
        if seen >= expected or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.1)


@pytest.fixture
def cluster(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        cluster.start_all()
        yield cluster
    finally:
        cluster.stop_all()


def test_rendered_configs_route_each_server_to_the_others_with_mutual_tls_and_a_password(
    tmp_path,
):
    servers = tuple(
        ClusterServer(name=n, host=h, port=4222, route_port=6222)
        for n, h in [("nats1", "nats1.example"), ("nats2", "192.0.2.2"), ("nats3", "nats3.example")]
    )
    bus_files.init(tmp_path / "bus", servers=servers, server_dir="/etc/otherix-bus")
    text = bus_files.server_conf_file(tmp_path / "bus", "nats2").read_text()
    secret = re.search(r'password: "([^"]+)"', text).group(1)
    assert len(secret) >= 40
    assert f"nats-route://route:{secret}@nats1.example:6222" in text
    assert f"nats-route://route:{secret}@nats3.example:6222" in text
    assert "192.0.2.2:6222" not in text  # not a route to itself
    assert 'ca_file: "/etc/otherix-bus/ca.pem"' in text and 'server_name: "nats2"' in text
    assert 'store_dir: "/etc/otherix-bus/jetstream/nats2"' in text
    for name in bus_files.ROLES:  # clients' files never hold the route password
        assert secret.encode() not in bus_files.role_seed_file(tmp_path / "bus", name).read_bytes()
    assert secret not in (tmp_path / "bus" / bus_files.ROSTER).read_text()
    # one certificate for every server's address
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "bus" / bus_files.SERVER_CERT).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName)) | {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    }
    assert {"nats1.example", "192.0.2.2", "nats3.example"} <= names


async def test_three_servers_form_a_cluster_and_replicate_intent_three_times(cluster):
    for s in cluster.servers:
        others = {o.name for o in cluster.servers} - {s.name}
        assert await wait_routes(cluster.monitor[s.name], others) >= others, s.name
    nc = await nats.connect(cluster.urls, **cluster.kwargs("controller"), connect_timeout=5)
    try:
        async with asyncio.timeout(30):  # the meta leader is elected a moment after routes
            while True:
                try:
                    store = await Store.open(nc.jetstream(), "otherix", replicas=3)
                    break
                except (nats.errors.Error, TimeoutError):
                    await asyncio.sleep(0.2)
        await store.kv.put("network.a", b"{}")
        info = (await store.kv.status()).stream_info
        assert info.config.num_replicas == 3
        assert info.cluster.leader in {s.name for s in cluster.servers}
        assert len(info.cluster.replicas) == 2
    finally:
        await nc.close()


async def test_clients_need_their_identity_on_every_server(cluster):
    for s in cluster.servers:
        with pytest.raises((nats.errors.Error, OSError)):
            await nats.connect(
                s.url,
                **connect_kwargs(None, cluster.bus / bus_files.CA_CERT),
                connect_timeout=2,
                allow_reconnect=False,
                max_reconnect_attempts=0,
            )
        nc = await nats.connect(s.url, **cluster.kwargs("admin"), connect_timeout=5)
        await nc.close()


def _fourth(cluster: Cluster, name: str, variant: str, other_ca: Path) -> tuple[Path, int, int]:
    """A fourth server's configuration: the cluster's own (from s1's) with its name and ports,
    then broken as ``variant`` says; returns (conf, client port, monitoring port)."""
    text = bus_files.server_conf_file(cluster.bus, "s1").read_text()
    port, route_port = free_port(), free_port()
    text = text.replace('server_name: "s1"', f'server_name: "{name}"')
    text = text.replace(f"127.0.0.1:{cluster.servers[0].port}", f"127.0.0.1:{port}")
    text = text.replace(f"127.0.0.1:{cluster.servers[0].route_port}", f"127.0.0.1:{route_port}")
    # it routes to every server of the cluster, the way a new member would
    secret = re.search(r'password: "([^"]+)"', text).group(1)
    routes = ", ".join(
        f'"nats-route://route:{secret}@127.0.0.1:{s.route_port}"' for s in cluster.servers
    )
    text = re.sub(r"routes: \[.*\]", f"routes: [{routes}]", text)
    match variant:
        case "member":  # the control: everything the cluster was made with
            pass
        case "no-password":
            text = text.replace(f"route:{secret}@", "")
            text = re.sub(r"  authorization \{.*\}\n", "", text)
        case "wrong-password":
            text = text.replace(secret, "x" * len(secret))
        case "no-route-tls":
            text = re.sub(r"  tls \{  # mutual.*?\n  \}\n", "", text, flags=re.S)
        case "other-ca":  # its own CA and certificate, for the same addresses
            for key in ("server-cert.pem", "server-key.pem", "ca.pem"):
                text = text.replace(str(cluster.bus / key), str(other_ca / key))
    conf = cluster.bus / f"{name}.conf"  # beside authorization.conf, which it includes
    conf.write_text(text)
    return conf, port, free_port()


async def test_a_server_without_the_route_credentials_cannot_join(cluster, tmp_path):
    other_ca = tmp_path / "other-ca"
    other_ca.mkdir()
    ca_cert, ca_key = pki.new_ca("not the bus CA")
    cert, key = pki.new_server_cert(ca_cert, ca_key, ())
    for name, data in [("ca.pem", ca_cert), ("server-cert.pem", cert), ("server-key.pem", key)]:
        (other_ca / name).write_bytes(data)
    members = {s.name for s in cluster.servers}
    for s in cluster.servers:
        assert await wait_routes(cluster.monitor[s.name], members - {s.name}) >= members - {s.name}
    variants = ["member", "no-password", "wrong-password", "no-route-tls", "other-ca"]
    monitors = {}
    for variant in variants:
        conf, port, monitor = _fourth(cluster, f"x-{variant}", variant, other_ca)
        cluster.start(f"x-{variant}", conf, port, monitor)
        monitors[variant] = monitor
    # the control joins: routes with all three members
    assert await wait_routes(monitors["member"], members, timeout=20) >= members
    await asyncio.sleep(3)  # nats-server retries a refused route every second
    for variant in variants[1:]:
        assert not routed_to(monitors[variant]), (
            f"{variant}: routed to {routed_to(monitors[variant])}"
        )
        for s in cluster.servers:
            assert f"x-{variant}" not in routed_to(cluster.monitor[s.name]), (variant, s.name)
