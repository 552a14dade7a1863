"""The egress guard: every outbound connection a tenant controls goes through here.

Tenants choose where the service connects: http steps, poll sources, their CRM's ``base_url``, their own
MCP servers, their SMTP server and their model's ``base_url``. Left alone, any of these reaches whatever
the worker's pod can reach — its own Redis and PostgreSQL, its supervisor's port, the cloud's metadata
endpoint (169.254.169.254), the cluster's private services. So every such connection is checked here,
against the address it is really made to:

* **Refused by default**: loopback, link-local (metadata endpoints included), private (10/8, 172.16/12,
  192.168/16), shared CGNAT (100.64/10), unique-local (fc00::/7), unspecified (0.0.0.0/8, ::), multicast
  and every other reserved or non-global range, in IPv4 and IPv6. An IPv4-mapped address (``::ffff:a.b.c.d``)
  is judged as the IPv4 address it is; a 6to4 (2002::/16) or NAT64 (64:ff9b::/96) address by the IPv4
  address it embeds.
* **Allowed by the operator**: ``AGENTWORKER_EGRESS_ALLOW``, comma-separated CIDRs (``10.1.2.0/24``, a bare
  address is a /32 or /128) and ``host:port`` pairs (``crm.internal:8443``, ``127.0.0.1:9999``,
  ``[fd00::5]:443``); a name in a pair allows whatever that name resolves to, on that port only. The list
  is read and validated with the other settings (:func:`agentworker.settings.parse_allow_list`).
* **Never allowed**: the service's own Redis, PostgreSQL and HTTP port (``AGENTWORKER_REDIS_URL``,
  ``AGENTWORKER_DATABASE_URL``, ``AGENTWORKER_HTTP_HOST``/``AGENTWORKER_PORT``): by name, by the addresses
  the name resolves to, and — when the service reaches them on this host (a loopback or wildcard address)
  — by any loopback, unspecified or own address of the host, on that port; even inside an allowed network.

A refusal is :class:`EgressRefused`, one sentence naming the address: "egress to 127.0.0.1:6379 refused:
loopback address; allow it with AGENTWORKER_EGRESS_ALLOW". No byte is sent and no connection is attempted.

How the connected address is checked (a name is resolved once; every address it gave is checked before
any connection; only checked addresses are connected to, so a DNS answer that changes between a check
and the connection — rebinding — cannot get round it; each redirect opens its connection through the
same path, so every hop is checked):

* **aiohttp** (http steps, poll sources, CRM: :func:`http_session`): a ``TCPConnector`` whose resolver
  resolves and checks, and whose ``socket_factory`` — called by aiohttp (aiohappyeyeballs) with the very
  address it is about to connect to — refuses anything not checked: IP literals never reach a resolver
  in aiohttp, so the factory is what checks them.
* **httpx** (the OpenAI client, tenant MCP servers: :func:`httpx_client`, :func:`mcp_client_factory`):
  an ``httpx.AsyncHTTPTransport`` over an httpcore connection pool with our network backend, whose
  ``connect_tcp`` resolves and checks, connects to a checked IP literal (TLS still verifies the original
  name) and confirms the stream's peer address before handing it over. httpx has no option for a network
  backend, so :func:`_guarded_transport` replaces the transport's pool — the one private attribute used
  here (``tests/test_egress.py`` fails if httpx stops sending requests through it). Proxies are not used
  (with a proxy the connected address would be the proxy's).
* **SMTP** (:func:`connect_socket`): a socket connected to a checked address, handed to aiosmtplib.

The guard reads the ``AGENTWORKER_*`` variables above from the environment (:func:`current_guard`,
rebuilt when they change), so each call site needs no settings object passed down.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpcore
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult

from agentworker.errors import AgentWorkerError
from agentworker.hosts import IPAddress, IPNetwork, ip_literal, normal_host, parse_ip, split_host_port, unmapped
from agentworker.settings import ALLOW_VARIABLE, AllowList, Settings, parse_allow_list

#: (host, port, family) -> the host's addresses, as text
Lookup = Callable[[str, int, int], Awaitable[list[str]]]
_ENV = ("AGENTWORKER_REDIS_URL", "AGENTWORKER_DATABASE_URL", "AGENTWORKER_HTTP_HOST", "AGENTWORKER_PORT",
        ALLOW_VARIABLE)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: internal ranges, in the order a refusal names them; anything else not global is "reserved"
_RANGES: tuple[tuple[str, tuple[IPNetwork, ...]], ...] = tuple(
    (reason, tuple(ipaddress.ip_network(n) for n in networks)) for reason, networks in (
        ("loopback address", ("127.0.0.0/8", "::1/128")),
        ("link-local address", ("169.254.0.0/16", "fe80::/10")),
        ("private address", ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")),
        ("shared (CGNAT) address", ("100.64.0.0/10",)),
        ("unique-local address", ("fc00::/7",)),
        ("unspecified address", ("0.0.0.0/8", "::/128")),
        ("multicast address", ("224.0.0.0/4", "ff00::/8")),
    ))


class EgressRefused(AgentWorkerError):
    """An outbound call a tenant controls was refused; the message is one sentence naming the address."""

    def __init__(self, target: str, reason: str, *, allowable: bool = True) -> None:
        self.target = target
        self.reason = reason
        hint = f"; allow it with {ALLOW_VARIABLE}" if allowable else ", which no allow-list opens to tenants"
        super().__init__(f"egress to {target} refused: {reason}{hint}")


def internal_reason(address: IPAddress) -> str | None:
    """Why ``address`` is internal ("loopback address", ...), or None for a public address."""
    address = unmapped(address)
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        inner = internal_reason(embedded)
        return None if inner is None else f"{inner} ({embedded}) inside {address}"
    for reason, networks in _RANGES:
        if any(address in network for network in networks):
            return reason
    if not address.is_global or address.is_reserved:
        return "reserved address"
    return None


@dataclass(slots=True)
class _Protected:
    """One of the service's own endpoints, which no tenant reaches."""

    what: str
    host: str
    port: int
    addresses: set[IPAddress] = field(default_factory=set)
    #: reached on this host: every loopback, unspecified and own address of the host counts
    local: bool = False
    #: the host is a name not resolved yet: every internal address on the port counts (fail closed)
    unresolved: bool = False


class EgressGuard:
    """The policy (allow list, the service's own endpoints) and the checks built on it."""

    def __init__(self, allow: AllowList, protected: Iterable[tuple[str, str, int]], *,
                 lookup: Lookup | None = None) -> None:
        self.allow = allow
        #: how tenants' host names are resolved (a seam for tests: the system resolver otherwise)
        self.lookup = lookup or _system_lookup
        self._protected: list[_Protected] = []
        for what, host, port in protected:
            entry = _Protected(what, normal_host(host), port)
            literal = ip_literal(entry.host)
            if literal is None:
                entry.unresolved = True
            else:
                entry.addresses.add(unmapped(literal))
                entry.local = literal.is_loopback or literal.is_unspecified
            self._protected.append(entry)
        #: this host's own addresses (looked up once: a host name that does not resolve stays unknown)
        self._own: set[IPAddress] | None = None
        self._prepared = False

    @classmethod
    def from_settings(cls, settings: Settings, *, lookup: Lookup | None = None) -> EgressGuard:
        return cls(parse_allow_list(settings.egress_allow), service_endpoints(settings), lookup=lookup)

    async def prepare(self) -> None:
        """Resolve the service's own host names (once; again while one fails) and this host's addresses."""
        if self._prepared:
            return
        if self._own is None:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(socket.gethostname(), None,
                                                                     type=socket.SOCK_STREAM)
                self._own = {unmapped(parse_ip(str(info[4][0]))) for info in infos}
            except OSError:
                self._own = set()
        complete = True
        for entry in self._protected:
            if not entry.unresolved:
                continue
            try:
                found = await self.lookup(entry.host, entry.port, 0)
            except OSError:
                complete = False
                continue
            entry.addresses |= {unmapped(parse_ip(text)) for text in found}
            entry.local = any(a.is_loopback or a.is_unspecified for a in entry.addresses)
            entry.unresolved = False
        self._prepared = complete

    def check(self, address: IPAddress, port: int, host: str | None = None) -> None:
        """Raise :class:`EgressRefused` unless connecting to ``address``:``port`` (for ``host``) is allowed."""
        address = unmapped(address)
        name = None if host is None else normal_host(host)
        if name is not None and ip_literal(name) is not None:
            name = None
        target = _target(name, address, port)
        own = self._own_endpoint(address, port, name)
        if own is not None:
            raise EgressRefused(target, own, allowable=False)
        allow = self.allow
        if (name is not None and (name, port) in allow.names) or (address, port) in allow.endpoints:
            return
        if any(address in network for network in allow.networks):
            return
        reason = internal_reason(address)
        if reason is not None:
            raise EgressRefused(target, reason)

    async def resolve(self, host: str, port: int, family: int = 0) -> list[IPAddress]:
        """The addresses of ``host``, each one checked (all or nothing): the only ones to connect to."""
        await self.prepare()
        name = normal_host(host)
        literal = ip_literal(name)
        if literal is not None:
            self.check(literal, port)
            return [literal]
        own = self._own_endpoint(None, port, name)
        if own is not None:
            raise EgressRefused(f"{name}:{port}", own, allowable=False)
        addresses = list(dict.fromkeys(parse_ip(text) for text in await self.lookup(name, port, family)))
        if not addresses:
            raise OSError(f"{name} has no address")
        for address in addresses:
            self.check(address, port, name)
        return addresses

    def _own_endpoint(self, address: IPAddress | None, port: int, name: str | None) -> str | None:
        for entry in self._protected:
            if entry.port != port:
                continue
            if name is not None and name == entry.host:
                return entry.what
            if address is None:
                continue
            if address in entry.addresses:
                return entry.what
            if entry.local and (address.is_loopback or address.is_unspecified or address in (self._own or ())):
                return entry.what
            if entry.unresolved and internal_reason(address) is not None:
                return f"{entry.what}, whose host {entry.host!r} did not resolve, may be there"
        return None


def service_endpoints(settings: Settings) -> list[tuple[str, str, int]]:
    """(what, host, port) of the service's own Redis, PostgreSQL and HTTP port."""
    found: list[tuple[str, str, int]] = []
    redis_scheme, _, rest = settings.redis_url.partition("://")
    if redis_scheme in ("redis", "rediss"):
        for host, port in _netloc_hosts(rest, 6379):
            found.append(("the service's own Redis (AGENTWORKER_REDIS_URL)", host, port))
    database_scheme, _, rest = settings.database_url.partition("://")
    if database_scheme in ("postgres", "postgresql"):
        for host, port in _netloc_hosts(rest, 5432):
            found.append(("the service's own PostgreSQL (AGENTWORKER_DATABASE_URL)", host, port))
    if settings.port:
        found.append(("the service's own HTTP port (AGENTWORKER_PORT)", settings.http_host, settings.port))
    return found


_current: tuple[tuple[str | None, ...], EgressGuard] | None = None


def current_guard() -> EgressGuard:
    """The guard of this process's ``AGENTWORKER_*`` environment (built again when it changes)."""
    global _current
    key = tuple(os.environ.get(name) for name in _ENV)
    if _current is None or _current[0] != key:
        _current = (key, EgressGuard.from_settings(Settings.from_env()))
    return _current[1]


# -- aiohttp ----------------------------------------------------------------------------------------------


@asynccontextmanager
async def http_session(*, timeout: aiohttp.ClientTimeout,
                       guard: EgressGuard | None = None) -> AsyncIterator[aiohttp.ClientSession]:
    """An ``aiohttp.ClientSession`` whose every connection (redirects too) passes the guard."""
    chosen = guard or current_guard()
    await chosen.prepare()
    #: (address, port) the resolver checked for a name: the socket factory lets exactly these through
    checked: set[tuple[IPAddress, int]] = set()

    def socket_factory(addr_info: Any) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        address, port = parse_ip(sockaddr[0]), int(sockaddr[1])
        if (address, port) not in checked:
            chosen.check(address, port)  # an IP literal: aiohttp did not ask the resolver
        return socket.socket(family, kind, proto)

    connector = aiohttp.TCPConnector(resolver=_AiohttpResolver(chosen, checked), socket_factory=socket_factory,
                                     use_dns_cache=False)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        yield session


class _AiohttpResolver(AbstractResolver):
    def __init__(self, guard: EgressGuard, checked: set[tuple[IPAddress, int]]) -> None:
        self._guard = guard
        self._checked = checked

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        addresses = await self._guard.resolve(host, port, family)
        self._checked.update((address, port) for address in addresses)
        return [{"hostname": host, "host": str(address), "port": port,
                 "family": socket.AF_INET6 if address.version == 6 else socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV} for address in addresses]

    async def close(self) -> None:
        return None


# -- httpx --------------------------------------------------------------------------------------------------


def httpx_client(*, timeout: httpx.Timeout | float, guard: EgressGuard | None = None, keepalive: bool = True,
                 **options: Any) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` whose every connection (redirects too) passes the guard.

    ``keepalive=False`` closes each connection when its response ends: for a client nobody closes (a chat
    model's), so no idle socket outlives the event loop it belongs to."""
    return httpx.AsyncClient(transport=_guarded_transport(guard, keepalive), timeout=timeout, **options)


def mcp_client_factory(guard: EgressGuard | None = None) -> Any:
    """An ``httpx_client_factory`` for MCP's streamable HTTP client, through the guard."""
    def factory(headers: dict[str, str] | None = None, timeout: httpx.Timeout | None = None,
                auth: httpx.Auth | None = None) -> httpx.AsyncClient:
        # As mcp's own factory: no redirects followed by httpx (the MCP transport follows same-origin ones).
        return httpx_client(timeout=timeout or httpx.Timeout(30, read=300), guard=guard, headers=headers,
                            auth=auth)

    return factory


def _guarded_transport(guard: EgressGuard | None, keepalive: bool = True) -> httpx.AsyncHTTPTransport:
    transport = httpx.AsyncHTTPTransport(trust_env=False)
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20 if keepalive else 0)
    # httpx takes no network backend: the same pool it would build, over ours (the one private attribute).
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False), max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
        network_backend=_GuardedBackend(guard))
    return transport


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, guard: EgressGuard | None) -> None:
        self._guard = guard
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        guard = self._guard or current_guard()
        try:
            async with asyncio.timeout(timeout):
                addresses = await guard.resolve(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        failure: Exception = httpcore.ConnectError(f"{host} has no address")
        for address in addresses:
            try:
                stream = await self._inner.connect_tcp(str(address), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
                continue
            peer = stream.get_extra_info("server_addr")
            if peer is None or parse_ip(peer[0]) != address:
                await stream.aclose()
                name = None if ip_literal(normal_host(host)) else normal_host(host)
                raise EgressRefused(_target(name, address, port), f"the connection reached {peer!r} instead")
            return stream
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise EgressRefused(f"unix socket {path}", "not a network address", allowable=False)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


# -- plain sockets (SMTP) -----------------------------------------------------------------------------------


async def connect_socket(host: str, port: int, *, timeout: float,
                         guard: EgressGuard | None = None) -> socket.socket:
    """A non-blocking TCP socket connected to a checked address of ``host``; OSError if none answers."""
    chosen = guard or current_guard()
    async with asyncio.timeout(timeout):
        addresses = await chosen.resolve(host, port)
    loop = asyncio.get_running_loop()
    failure: OSError = OSError(f"{host} has no address")
    for address in addresses:
        sock = socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (str(address), port))
        except OSError as exc:  # TimeoutError too
            sock.close()
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise failure


# -- helpers ------------------------------------------------------------------------------------------------


async def _system_lookup(host: str, port: int, family: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _netloc_hosts(rest: str, default_port: int) -> list[tuple[str, int]]:
    """(host, port) of each host in a URL's authority (libpq URLs may list several: ``h1:5432,h2``)."""
    authority = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    found = []
    for part in authority.split(",") if authority else ["localhost"]:
        host, port = split_host_port(part)
        if port is None:
            host, port = normal_host(part), default_port
        found.append((host or "localhost", port))
    return found


def _target(name: str | None, address: IPAddress, port: int) -> str:
    shown = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
    return shown if name is None else f"{name}:{port} ({address})"
