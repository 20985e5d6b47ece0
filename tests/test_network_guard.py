"""The suite's network block holds in this process and in every subprocess a test starts; no test
here sends a packet: the real connect is swapped for a recorder before anything is tried."""

import socket
import subprocess
import sys

import pytest
from helpers import ROOT, script_env

PROBE = """
import socket, sitecustomize as guard
assert socket.socket.connect is guard._guarded_connect, "guard not installed at start-up"
calls = []
guard._real_connect = guard._real_connect_ex = lambda sock, addr: calls.append(addr)  # never a real connect
s = socket.socket()
try:
    s.connect(("192.0.2.1", 80))
except RuntimeError as e:
    print("blocked:", e)
s.connect(("127.0.0.1", 9))
print("passed through:", calls)
"""


@pytest.mark.parametrize("env", ["inherited", "script_env"])
def test_subprocesses_cannot_reach_the_network(env):
    kw = {} if env == "inherited" else {"env": script_env()}
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60, **kw)
    assert r.returncode == 0, r.stderr
    assert "blocked: test tried to reach the network: ('192.0.2.1', 80)" in r.stdout
    assert "passed through: [('127.0.0.1', 9)]" in r.stdout  # loopback stays allowed


def test_this_process_cannot_reach_the_network(monkeypatch):
    import sitecustomize as guard

    calls = []
    monkeypatch.setattr(guard, "_real_connect", lambda sock, addr: calls.append(addr))
    with socket.socket() as s, pytest.raises(RuntimeError, match="reach the network"):
        s.connect(("example.org", 443))
    with socket.socket() as s, pytest.raises(RuntimeError, match="reach the network"):
        s.connect(("10.1.2.3", 443))
    assert calls == []
