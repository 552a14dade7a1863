"""Host names, IP addresses and ``host:port`` text, read one way by the settings (the
``AGENTWORKER_EGRESS_ALLOW`` list, :func:`agentworker.settings.parse_allow_list`) and by the egress guard
(:mod:`agentworker.egress`). Pure functions of text: no lookups, no settings.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(text: str) -> IPAddress:
    """The address ``text`` names, without its IPv6 zone (``fe80::1%eth0``); ValueError if it names none."""
    return ipaddress.ip_address(text.split("%", 1)[0])


def ip_literal(host: str) -> IPAddress | None:
    """The address when ``host`` is an IP literal, None when it is a name."""
    try:
        return parse_ip(host)
    except ValueError:
        return None


def unmapped(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) stands for; others unchanged."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def normal_host(host: str) -> str:
    """A host as compared: no brackets, no trailing dot, lower case."""
    return host.strip().strip("[]").rstrip(".").lower()


def split_host_port(entry: str) -> tuple[str, int | None]:
    """``host:port`` or ``[v6]:port`` as (normal host, port); the port is None when missing or out of range
    (the host is then returned as written)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = entry.rpartition(":")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        return host, None
    return normal_host(host), int(port_text)
