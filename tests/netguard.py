"""In-process network guard for the tests: any connection (or DNS look-up) to a host other than the
loopback interface is recorded and refused. Used suite-wide by conftest.py and asserted on by
test_network_guard.py."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest


class OutwardConnection(OSError):
    """Raised instead of connecting anywhere but 127.0.0.1 / ::1."""


def is_loopback(host: Any) -> bool:
    """127.0.0.0/8, ::1 and the name localhost (a Unix socket path counts as local too)."""
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class NetGuard:
    """Patches `socket` so that outward connections and name look-ups fail and are listed in ``attempts``."""

    def __init__(self) -> None:
        self.attempts: list[str] = []
        self.allowed: set[str] = set()

    def allow(self, host: str) -> None:
        """Let connections to ``host`` through (e.g. this machine's own address, where a local Ray's GCS
        listens: it never leaves the machine)."""
        self.allowed.add(host)

    def _check(self, what: str, address: Any) -> None:
        if isinstance(address, (str, bytes)):  # AF_UNIX path
            return
        host = address[0] if isinstance(address, tuple) and address else address
        if not is_loopback(host) and host not in self.allowed:
            self.attempts.append(f"{what} {address!r}")
            raise OutwardConnection(f"tests forbid network access outside 127.0.0.1: {what} {address!r}")

    def install(self, mp: pytest.MonkeyPatch) -> NetGuard:
        guard = self
        real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
        real_getaddrinfo = socket.getaddrinfo

        def connect(sock: socket.socket, address: Any) -> Any:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                guard._check("connect", address)
            return real_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> Any:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                guard._check("connect", address)
            return real_connect_ex(sock, address)

        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            if host is not None:
                try:
                    guard._check("resolve", (host,))
                except OutwardConnection as exc:
                    raise socket.gaierror(socket.EAI_NONAME, str(exc)) from None
            return real_getaddrinfo(host, *args, **kwargs)

        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket.socket, "connect_ex", connect_ex)
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        return self
