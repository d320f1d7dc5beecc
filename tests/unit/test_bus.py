"""The bus tooling without a running server: roster → configuration text, the bus directory's
files and modes, refusals that change nothing, the certificates and ``connect_kwargs``."""

import ipaddress
import json
import re
import subprocess

import msgspec
import pytest
from cryptography import x509

from client.bus import cli, connect_kwargs, files, permissions, pki
from client.bus.permissions import Roster
from schemas import api
from tests.busauth import file_modes, nats_server_binary


def _key() -> str:
    return pki.public_key(pki.new_user_seed())


def _roster(**nodes_and_fields) -> Roster:
    fields = {"server_dir": "/etc/otherix-bus", "store_dir": "/data"}
    fields.update(nodes_and_fields)
    fields.setdefault("nodes", {"n2": _key(), "n1": _key()})
    return Roster(controller=_key(), admin=_key(), viewer=_key(), **fields)


def _users(text: str) -> dict[str, dict]:
    """``# label`` comment → the permissions of the user that follows, parsed back."""
    out, label = {}, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# ") and label is None and "otherix-bus" not in line:
            label = line[2:]
        elif label and line.startswith("publish:"):
            out[label] = {"publish": json.loads(re.search(r"\[.*?\]", line)[0])}
            out[label]["allow_responses"] = "allow_responses: true" in line
        elif label and line.startswith("subscribe:"):
            out[label]["subscribe"] = json.loads(re.search(r"\[.*\]", line)[0])
            label = None
    return out


def test_every_api_endpoint_is_classified():
    assert set(permissions.READ_ENDPOINTS) <= set(api.ENDPOINTS)
    assert set(permissions.NODE_SCOPED_ENDPOINTS) <= set(api.ENDPOINTS)
    assert not set(permissions.READ_ENDPOINTS) & set(permissions.NODE_SCOPED_ENDPOINTS)


def test_authorization_is_the_permission_matrix():
    roster = _roster()
    users = _users(permissions.render_authorization(roster))
    inbox = {label: f"_INBOX.{key}.>" for label, key, _ in permissions.identities(roster)}
    assert users == {
        "controller": {
            "publish": ["otherix.v1.desired.*", "$JS.API.>", "$KV.otherix.>", "_INBOX.>"],
            "allow_responses": False,
            "subscribe": [
                "otherix.v1.api.>",
                "$SRV.>",
                "otherix.v1.ack.*",
                "otherix.v1.health.*",
                inbox["controller"],
            ],
        },
        "admin": {
            "publish": ["otherix.v1.api.>"],
            "allow_responses": False,
            "subscribe": ["otherix.v1.ack.*", "otherix.v1.health.*", inbox["admin"]],
        },
        "viewer": {
            "publish": [
                "otherix.v1.api.network.list",
                "otherix.v1.api.network.show",
                "otherix.v1.api.nic.list",
                "otherix.v1.api.node.list",
                "otherix.v1.api.status",
            ],
            "allow_responses": False,
            "subscribe": ["otherix.v1.ack.*", "otherix.v1.health.*", inbox["viewer"]],
        },
        **{
            f"node {n}": {
                "publish": [
                    f"otherix.v1.ack.{n}",
                    f"otherix.v1.health.{n}",
                    f"otherix.v1.api.node.register.{n}",
                    f"otherix.v1.api.section.get.{n}",  # its own sections only
                ],
                "allow_responses": False,
                "subscribe": [f"otherix.v1.desired.{n}", inbox[f"node {n}"]],
            }
            for n in ("n1", "n2")
        },
    }
    assert list(users) == ["controller", "admin", "viewer", "node n1", "node n2"]  # sorted
    assert permissions.render_authorization(roster) == permissions.render_authorization(roster)


def test_bucket_scopes_the_controllers_kv_subjects():
    users = _users(permissions.render_authorization(_roster(bucket="intent-2")))
    assert "$KV.intent-2.>" in users["controller"]["publish"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"nodes": {"N1": None}}, "lowercase DNS label"),
        ({"nodes": {"n1": "SUAFOO"}}, "public user nkey"),
        ({"bucket": "a.b"}, "bucket"),
        ({"port": 0}, "port"),
        ({"schema": 2}, "schema"),
    ],
)
def test_invalid_roster_is_refused(change, message):
    if "nodes" in change:
        change = {"nodes": {n: k or _key() for n, k in change["nodes"].items()}}
    with pytest.raises(ValueError, match=message):
        permissions.render_authorization(_roster(**change))


def test_one_key_for_two_identities_is_refused():
    key = _key()
    with pytest.raises(ValueError, match="share one key"):
        permissions.render_authorization(_roster(nodes={"n1": key, "n2": key}))


def test_init_writes_a_private_directory_that_nats_server_accepts(tmp_path):
    bus = tmp_path / "bus"
    roster = files.init(bus, nodes=("n1", "n2"), hosts=("10.1.2.3", "nats.example"), port=4333)
    modes = file_modes(bus)
    assert modes.pop("bus") == 0o700
    assert set(modes.values()) == {0o600}
    assert set(modes) == {
        "roster.json",
        "nats-server.conf",
        "authorization.conf",
        "ca.pem",
        "ca-key.pem",
        "server-cert.pem",
        "server-key.pem",
        "controller.nk",
        "admin.nk",
        "viewer.nk",
        "node-n1.nk",
        "node-n2.nk",
    }
    assert files.load_roster(bus) == roster
    assert (bus / "authorization.conf").read_text() == permissions.render_authorization(roster)
    conf = (bus / "nats-server.conf").read_text()
    assert '"0.0.0.0:4333"' in conf and f'"{bus}/server-cert.pem"' in conf
    result = subprocess.run(
        [nats_server_binary(), "-c", str(bus / "nats-server.conf"), "-t"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_server_certificate_is_signed_by_the_ca_for_every_host(tmp_path):
    files.init(tmp_path / "bus", hosts=("10.1.2.3", "nats.example"))
    ca = x509.load_pem_x509_certificate((tmp_path / "bus/ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "bus/server-cert.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "nats.example"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
    }


def test_renewed_certificate_has_the_new_hosts_and_the_same_ca(tmp_path):
    bus = tmp_path / "bus"
    files.init(bus, hosts=("10.1.2.3",))
    old = (bus / "server-cert.pem").read_bytes()
    with pytest.raises(files.BusError, match="not a DNS name"):
        files.renew_server_cert(bus, ("bad host",))
    assert (bus / "server-cert.pem").read_bytes() == old
    assert files.renew_server_cert(bus, ("nats.example",)).hosts == ("nats.example",)
    assert files.load_roster(bus).hosts == ("nats.example",)
    assert file_modes(bus)["server-key.pem"] == 0o600
    ca = x509.load_pem_x509_certificate((bus / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((bus / "server-cert.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "nats.example"}


def test_empty_store_dir_leaves_the_store_to_the_sd_flag(tmp_path):
    files.init(tmp_path / "bus", store_dir="")
    conf = (tmp_path / "bus/nats-server.conf").read_text()
    assert "store_dir:" not in conf
    result = subprocess.run(
        [nats_server_binary(), "-c", str(tmp_path / "bus/nats-server.conf"), "-t"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_server_dir_is_where_the_server_sees_the_files(tmp_path):
    files.init(tmp_path / "bus", server_dir="/etc/otherix-bus", store_dir="/data")
    conf = (tmp_path / "bus/nats-server.conf").read_text()
    assert '"/etc/otherix-bus/server-key.pem"' in conf and 'store_dir: "/data"' in conf


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"nodes": ("n1", "Bad_Name")}, "lowercase DNS label"),
        ({"nodes": ("n1", "n1")}, "named twice"),
        ({"hosts": ("not a host",)}, "not a DNS name or IP"),
        ({"bucket": "no.dots"}, "bucket"),
        ({"port": 70000}, "port"),
    ],
)
def test_init_refuses_bad_input_and_writes_nothing(tmp_path, kwargs, message):
    with pytest.raises(files.BusError, match=message):
        files.init(tmp_path / "bus", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_init_refuses_a_directory_in_use(tmp_path):
    files.init(tmp_path / "bus")
    before = {p.name: p.read_bytes() for p in (tmp_path / "bus").iterdir()}
    with pytest.raises(files.BusError, match="not an empty directory"):
        files.init(tmp_path / "bus", nodes=("n1",))
    assert {p.name: p.read_bytes() for p in (tmp_path / "bus").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["bus"]  # no staging left behind


def test_add_and_revoke_rewrite_the_authorization(tmp_path):
    bus = tmp_path / "bus"
    files.init(bus, nodes=("n1",))
    seed = files.add_node(bus, "n2")
    roster = files.load_roster(bus)
    assert roster.nodes["n2"] == pki.public_key(seed.read_bytes())
    assert file_modes(bus)["node-n2.nk"] == 0o600
    assert (bus / "authorization.conf").read_text() == permissions.render_authorization(roster)
    assert "otherix.v1.desired.n2" in (bus / "authorization.conf").read_text()

    files.revoke_node(bus, "n2")
    roster = files.load_roster(bus)
    assert set(roster.nodes) == {"n1"} and not seed.exists()
    text = (bus / "authorization.conf").read_text()
    assert text == permissions.render_authorization(roster)
    assert ".n2" not in text


@pytest.mark.parametrize(
    "action, node, message",
    [
        (files.add_node, "n1", "already has an identity"),
        (files.add_node, "-bad", "lowercase DNS label"),
        (files.revoke_node, "n9", "has no identity"),
        (files.revoke_node, "N1", "lowercase DNS label"),
    ],
)
def test_refused_changes_leave_the_directory_as_it_was(tmp_path, action, node, message):
    bus = tmp_path / "bus"
    files.init(bus, nodes=("n1",))
    before = {p.name: p.read_bytes() for p in bus.iterdir() if p.name != ".lock"}
    with pytest.raises(files.BusError, match=message):
        action(bus, node)
    assert {p.name: p.read_bytes() for p in bus.iterdir() if p.name != ".lock"} == before


def test_not_a_bus_directory(tmp_path):
    with pytest.raises(files.BusError, match="not a bus directory"):
        files.add_node(tmp_path, "n1")


def test_connect_kwargs_use_the_identitys_inbox(tmp_path):
    files.init(tmp_path / "bus", nodes=("n1",))
    seed = files.node_seed_file(tmp_path / "bus", "n1")
    kwargs = connect_kwargs(seed, tmp_path / "bus/ca.pem", name="agent n1")
    key = files.load_roster(tmp_path / "bus").nodes["n1"]
    assert kwargs["inbox_prefix"] == f"_INBOX.{key}"
    assert kwargs["nkeys_seed"] == str(seed) and kwargs["name"] == "agent n1"
    assert kwargs["tls"].check_hostname
    assert connect_kwargs(None, None) == {}
    (tmp_path / "junk.nk").write_text("SUNOTASEED\n")
    with pytest.raises(ValueError, match="nkey seed"):
        connect_kwargs(tmp_path / "junk.nk", None)


def test_denied_recognises_permission_refusals():
    from client.bus.connect import denied

    e = Exception('nats: permissions violation for publish to "otherix.v1.api.network.delete"')
    assert denied(e) == ("publish", "otherix.v1.api.network.delete")
    e = Exception('nats: Permissions Violation for Subscription to "_INBOX.>"')
    assert denied(e) == ("subscription", "_INBOX.>")
    assert denied(Exception("nats: 'Authorization Violation'")) is None


def test_cli_init_show_and_errors(tmp_path, capsys):
    bus = tmp_path / "bus"
    cli.main(["init", str(bus), "--nodes", "n1,n2", "--host", "10.0.0.5"])
    cli.main(["add-node", str(bus), "n3"])
    cli.main(["show", str(bus), "--json"])
    rows = msgspec.json.decode(capsys.readouterr().out.splitlines()[-1])
    assert [r["identity"] for r in rows] == ["controller", "admin", "viewer"] + [
        f"node {n}" for n in ("n1", "n2", "n3")
    ]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["add-node", str(bus), "n3"])
    assert exit_.value.code == 2
    assert "otherix-bus: error: node n3 already has an identity" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a wrong pid refuses the whole command
        cli.main(["revoke-node", str(bus), "n1", "--reload-pid", "999999999"])
    assert "no process 999999999" in capsys.readouterr().err
    assert "n1" in files.load_roster(bus).nodes
