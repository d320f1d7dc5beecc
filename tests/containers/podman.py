"""podman, podman-compose and the image for tests/containers, with nothing from a registry.

Owns: the base image (``debootstrap --variant=minbase bookworm`` imported with ``podman import``,
made once and kept under its tag), the project image built on it from the Dockerfile, a compose
project under a unique name with ``compose.yaml`` copied into a directory of the test's, and
removing everything that project made (containers, pods, volumes, networks) by its label.
Every podman call reads ``deploy/containers.conf`` through CONTAINERS_CONF, never the host's.
Never removes a tagged image (only the untagged one a rebuild leaves) nor anything labelled
with another project; never touches a namespace.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = ROOT / "deploy" / "containers.conf"
BIN = Path(sys.executable).parent  # the venv's podman-compose and otherixctl
BASE_IMAGE = "localhost/otherix-base:bookworm"
IMAGE = "localhost/otherix-networking:test"
SITE_CAS = Path("/usr/local/share/ca-certificates")  # e.g. a TLS-inspecting proxy's CA
PROJECT_LABEL = "io.podman.compose.project"


def podman_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF), **extra}


def run(*argv, env=None, timeout: float = 120.0, check: bool = True) -> str:
    """argv's stdout; on failure an AssertionError with the command and what it printed."""
    proc = subprocess.run(
        [str(a) for a in argv], env=env or podman_env(), capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))}: exit {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    return proc.stdout


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name], env=podman_env()).returncode == 0


def ensure_base_image(workdir: Path) -> float | None:
    """Make BASE_IMAGE unless it exists; the seconds it took, or None when it was cached. The
    host's site CAs go along, so pip in the build trusts what this machine trusts."""
    if image_exists(BASE_IMAGE):
        return None
    started = time.monotonic()
    rootfs = workdir / "rootfs"
    try:
        run("debootstrap", "--variant=minbase", "bookworm", rootfs, timeout=600)
        cas = rootfs / SITE_CAS.relative_to("/")
        cas.mkdir(parents=True, exist_ok=True)
        for ca in SITE_CAS.glob("*.crt"):
            shutil.copy(ca, cas / ca.name)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                ["podman", "import", "-q", "-", BASE_IMAGE], stdin=tar.stdout, env=podman_env(),
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
        finally:
            tar.stdout.close()
            tar.wait()
        assert imported.returncode == 0 and tar.returncode == 0, imported.stderr
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)  # 200 MB; the image keeps what it needs
    return time.monotonic() - started


def build_image() -> float:
    """Build IMAGE from the Dockerfile on BASE_IMAGE (network for the build only: Debian's
    mirror and PyPI); unchanged layers come from podman's cache. Returns the seconds it took."""
    started = time.monotonic()
    run("podman", "build", "--network", "host", "--build-arg", f"BASE={BASE_IMAGE}",
        "-t", IMAGE, ROOT, timeout=900)  # fmt: skip
    run("podman", "image", "prune", "-f", timeout=120)  # the previous build's untagged image
    return time.monotonic() - started


class Compose:
    """``podman-compose -p NAME`` on a copy of compose.yaml (so ./bus lands in ``directory``)
    plus ``overrides``, with ``variables`` set for interpolation."""

    def __init__(self, name: str, directory: Path, overrides: str, variables: dict[str, str]):
        self.name = name
        self.directory = directory
        shutil.copy(ROOT / "compose.yaml", directory / "compose.yaml")
        (directory / "compose.test.yaml").write_text(overrides)
        self.env = podman_env(OTHERIX_IMAGE=IMAGE, **variables)

    def __call__(self, *args: str, timeout: float = 120.0) -> str:
        return run(
            BIN / "podman-compose", "-p", self.name,
            "-f", self.directory / "compose.yaml", "-f", self.directory / "compose.test.yaml",
            *args, env=self.env, timeout=timeout,
        )  # fmt: skip

    def containers(self) -> dict[str, str]:
        """service → container id, of the project's running containers."""
        out = run("podman", "ps", "--filter", f"label={PROJECT_LABEL}={self.name}",
                  "--format", '{{.ID}} {{index .Labels "com.docker.compose.service"}}')  # fmt: skip
        return {service: cid for cid, service in (line.split() for line in out.splitlines())}

    def container(self, service: str) -> str:
        """The name podman-compose gives the service's (first) container."""
        return f"{self.name}_{service}_1"

    def logs(self) -> str:
        out = []
        for service in ("nats", "controller", "agent"):
            name = self.container(service)
            logs = subprocess.run(["podman", "logs", "--tail", "30", name], env=podman_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
            out.append(f"--- {name}\n{logs.stdout}")
        return "\n".join(out)

    def remove_everything(self) -> None:
        """``down -v``, then whatever is still labelled with the project (a half-made start)."""
        try:
            self("down", "-v", "-t", "5", timeout=180)
        except (AssertionError, subprocess.TimeoutExpired):
            pass
        label = f"label={PROJECT_LABEL}={self.name}"
        for listing, removal in (
            (("ps", "-a"), ("rm", "-f", "-t", "0")),
            (("pod", "ps"), ("pod", "rm", "-f")),
            (("volume", "ls"), ("volume", "rm", "-f")),
            (("network", "ls"), ("network", "rm", "-f")),
        ):
            ids = run("podman", *listing, "-q", "--filter", label, check=False, timeout=60).split()
            if ids:
                run("podman", *removal, *ids, check=False, timeout=120)
