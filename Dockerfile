# One image for every Otherix networking command; the default is the node agent.
# The agent needs the host's network (compose: network_mode host), NET_ADMIN and /dev/net/tun.
FROM python:3.11-slim-bookworm

# wireguard-go: the userspace WireGuard the agent drives when the kernel has no module;
# wireguard-tools for `wg show` when debugging; nftables for NAT and the VXLAN guard.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        wireguard-go wireguard-tools nftables iproute2 iputils-ping \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml ./
COPY schemas ./schemas
COPY client ./client
COPY controller ./controller
COPY agent ./agent
COPY lab ./lab
RUN pip install --no-cache-dir . && rm -rf /src

WORKDIR /
CMD ["otherix-agent"]
