"""The server's limits and keys, as `phixtral serve` sets them (no HTTP stack needed to import this)."""

import ipaddress
from dataclasses import dataclass
from typing import Optional

LOOPBACK_NAMES = ("localhost", "localhost.")


@dataclass
class Limits:
    """The server's limits and keys (`phixtral serve` flags). loopback_only: the server listens on a loopback address
    only, so the Host check applies."""

    max_request_bytes: int = 2 * 2**20
    max_tokens: Optional[int] = None  # per request; None: up to the context
    max_prompts: int = 16  # prompts x n per request
    api_key: Optional[str] = None
    loopback_only: bool = True


def is_loopback(host: str) -> bool:
    """Whether a bind address or a Host header's name is a loopback one."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
