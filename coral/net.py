"""Which addresses are this machine's own: a server binds a public address only with a token, and a
client sends a key over plain http only to a loopback address."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlparse


def is_loopback(host: str) -> bool:
    """``localhost`` and 127.0.0.0/8, ::1; any other name or address is not (names are not resolved: a
    name that resolves to 127.0.0.1 today may not tomorrow)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_stays_private(url: str) -> bool:
    """Whether a key may be sent to ``url``: over https anywhere, over plain http only to a loopback
    address (where no one else is on the wire)."""
    parsed = urlparse(url)
    return parsed.scheme == "https" or (parsed.scheme == "http" and is_loopback(parsed.hostname or ""))
