"""Test-wide fixtures: no network (any non-loopback connection fails), few threads, offline hubs."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

NETGUARD = Path(__file__).parent / "netguard"
sys.path.insert(0, str(NETGUARD))
import sitecustomize as netguard  # noqa: E402 - the guard every subprocess installs too

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_HOME", os.path.join(os.path.dirname(__file__), ".no-torch-home"))
# subprocesses started by tests (with this environment or helpers.script_env) import the guard at start-up
os.environ["LVD_BLOCK_NETWORK"] = "1"
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NETGUARD), os.environ.get("PYTHONPATH")]))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", netguard._guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", netguard._guarded_connect_ex)
    yield


@pytest.fixture(autouse=True)
def _few_threads():
    """Two intra-op threads for every test, restored after each: scripts run in-process may change
    the count (encode_latents leaves a core per DataLoader worker), and float results depend on it."""
    import torch

    torch.set_num_threads(2)
    yield
    torch.set_num_threads(2)


# ----------------------------------------------------------------------------- end-to-end fixtures


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """Built once per session and shared by the script-level tests (treat it as read-only):
    8 synthetic mp4s (3 classes, 16 frames of 32x32), a tiny FrameVAE trained 2 steps and its
    export, and video-only latent shards of it (2 shards, 16 clips of 8 frames, latents [4, 8, 8, 8])."""
    from helpers import build_pipeline

    return build_pipeline(tmp_path_factory.mktemp("pipeline"))
