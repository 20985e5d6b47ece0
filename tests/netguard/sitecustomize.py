"""Network guard for the test suite: any non-loopback socket connection raises.

The test process installs it from conftest.py; every subprocess a test starts (scripts, `accelerate
launch` and its ranks, benchmark workers) finds this folder first on PYTHONPATH, so Python imports this
file at start-up and, with LVD_BLOCK_NETWORK=1, installs the same guard there: a hidden download
anywhere fails the tests.
"""

from __future__ import annotations

import ipaddress
import os
import socket

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it would need a DNS lookup, which is network too
        return False


def _guarded_connect(self, address):
    if not _is_local(address):
        raise RuntimeError(f"test tried to reach the network: {address!r}")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_local(address):
        raise RuntimeError(f"test tried to reach the network: {address!r}")
    return _real_connect_ex(self, address)


def install() -> None:
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex


if os.environ.get("LVD_BLOCK_NETWORK") == "1":
    install()
