"""Typed client of the controller API, used by otherixctl, the agent, the lab and tests.

Errors are the controller's own ``schemas.errors`` classes, re-created from a reply's code
(``ApiError`` is re-exported here), plus ``Unavailable`` and ``Timeout`` when no controller
answers. It never retries: callers decide (every write is safe to repeat, see
``controller.api``). Listings follow the controller's cursors page by page and return the whole
list, as one reply did before paging.
"""

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from schemas import api, errors, naming
from schemas.codec import decode, encode
from schemas.errors import ApiError
from schemas.intent import Egress, NetworkType
from schemas.wire import SectionData, SectionGet

__all__ = ["ApiClient", "ApiError"]

T = TypeVar("T")
MAX_PAGES = 100_000  # a cursor that never ends is a controller bug, not a long list


class ApiClient:
    def __init__(self, nc: Client, timeout: float = 5.0):
        self.nc, self.timeout = nc, timeout

    async def call(
        self,
        endpoint: str,
        request: msgspec.Struct,
        reply_type: type[T],
        subject: str | None = None,
    ) -> T:
        try:
            msg = await self.nc.request(
                subject or naming.api_subject(endpoint), encode(request), timeout=self.timeout
            )
        except NoRespondersError:
            raise errors.Unavailable("no controller is answering on this NATS server") from None
        except NatsTimeout:
            raise errors.Timeout(
                f"the controller did not answer {endpoint} within {self.timeout}s"
            ) from None
        headers = msg.headers or {}
        if "Nats-Service-Error-Code" in headers:
            code = int(headers["Nats-Service-Error-Code"] or 500)
            raise errors.from_code(code, headers.get("Nats-Service-Error", "unknown error"))
        return decode(msg.data, reply_type)

    async def network_create(
        self,
        name: str,
        type: NetworkType | str,
        subnet: str,
        egress: Egress | str = Egress.NONE,
        vni: int | None = None,
    ) -> api.NetworkInfo:
        req = api.NetworkCreate(
            name=name, type=NetworkType(type), subnet=subnet, egress=Egress(egress), vni=vni
        )
        return await self.call("network.create", req, api.NetworkInfo)

    async def network_list(self) -> list[api.NetworkInfo]:
        return await self.call("network.list", api.Empty(), list[api.NetworkInfo])

    async def network_show(self, name: str) -> api.NetworkInfo:
        return await self.call("network.show", api.ByName(name=name), api.NetworkInfo)

    async def network_delete(self, name: str, force: bool = False) -> api.NetworkInfo:
        return await self.call(
            "network.delete", api.NetworkDelete(name=name, force=force), api.NetworkInfo
        )

    async def nic_attach(
        self,
        network: str,
        node: str,
        vm: str,
        mac: str | None = None,
        ip: str | None = None,
        port_security: bool = True,
    ) -> api.NicInfo:
        req = api.NicAttach(
            network=network, node=node, vm=vm, mac=mac, ip=ip, port_security=port_security
        )
        return await self.call("nic.attach", req, api.NicInfo)

    async def nic_detach(self, nic_id: str) -> api.NicInfo:
        return await self.call("nic.detach", api.NicDetach(id=nic_id), api.NicInfo)

    async def nic_list(
        self, network: str | None = None, node: str | None = None
    ) -> list[api.NicInfo]:
        async def fetch(cursor: str | None) -> tuple[tuple[api.NicInfo, ...], str | None]:
            req = api.NicFilter(network=network, node=node, cursor=cursor)
            got = await self.call("nic.list", req, api.NicPage)
            return got.items, got.next

        return await _all_pages("nic.list", fetch)

    async def node_register(self, **fields: Any) -> api.NodeStatus:
        req = api.NodeRegister(**fields)
        try:
            subject = naming.node_api_subject("node.register", req.name)  # the bus checks who
        except ValueError as e:
            raise errors.BadRequest(str(e)) from None
        return await self.call("node.register", req, api.NodeStatus, subject)

    async def section_get(self, req: SectionGet) -> SectionData:
        """An agent's fetch of one of its desired-state sections (``schemas.wire``)."""
        subject = naming.node_api_subject("section.get", req.name)  # the bus checks who asks
        return await self.call("section.get", req, SectionData, subject)

    async def node_rekey(self, name: str) -> api.NodeStatus:
        return await self.call("node.rekey", api.ByName(name=name), api.NodeStatus)

    async def node_list(self) -> list[api.NodeStatus]:
        async def fetch(cursor: str | None) -> tuple[tuple[api.NodeStatus, ...], str | None]:
            got = await self.call("node.list", api.Page(cursor=cursor), api.NodePage)
            return got.items, got.next

        return await _all_pages("node.list", fetch)

    async def node_remove(self, name: str, force: bool = False) -> api.NodeStatus:
        return await self.call(
            "node.remove", api.NodeRemove(name=name, force=force), api.NodeStatus
        )

    async def status(self) -> api.Status:
        """Every node's status; the counts are the first page's, ``converged`` holds only if
        every page said so (the cluster may change while the pages come in)."""
        pages: list[api.Status] = []

        async def fetch(cursor: str | None) -> tuple[tuple[api.NodeStatus, ...], str | None]:
            got = await self.call("status", api.Page(cursor=cursor), api.Status)
            pages.append(got)
            return got.nodes, got.next

        nodes = await _all_pages("status", fetch)
        converged = all(page.converged for page in pages)
        return msgspec.structs.replace(pages[0], nodes=tuple(nodes), converged=converged, next=None)


async def _all_pages(
    endpoint: str, fetch: Callable[[str | None], Awaitable[tuple[tuple[T, ...], str | None]]]
) -> list[T]:
    items: list[T] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        page, following = await fetch(cursor)
        items.extend(page)
        if following is None:
            return items
        if following == cursor or not page:
            break
        cursor = following
    raise errors.Internal(f"{endpoint}: the controller's pages did not end (cursor {cursor!r})")
