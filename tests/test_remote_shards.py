"""Shards read from a URL: a real HTTP server on 127.0.0.1 serving a shard folder, a connection
cut in the middle of a shard (retried, no sample lost or repeated), a 404 (a clear error naming
the shard), and training from the URL giving the same loss curve as from the folder."""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import threading

import pytest
import torch
from helpers import DIFF_TINY, read_metrics

from data.latents import make_latent_loader
from data.shards import ShardError


class ShardHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; `cuts[name] = (offset, times)` sends the full Content-Length, then only
    `offset` bytes, then drops the connection (the next `times` requests for that file)."""

    cuts: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        offset, times = self.cuts.get(name, (0, 0))
        if not times:
            return super().do_GET()
        self.cuts[name] = (offset, times - 1)
        data = (self.server.folder / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:offset])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True


@pytest.fixture()
def server(pipeline, tmp_path):
    folder = tmp_path / "served"
    shutil.copytree(pipeline.shards, folder)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(ShardHandler, directory=str(folder)))
    srv.folder = folder
    ShardHandler.cuts = {}
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}/", folder
    srv.shutdown()
    srv.server_close()


def _epoch(source, **kw):
    return [(b["key"], b["latent"]) for b in make_latent_loader(source, kind="video", batch_size=4, seed=3, **kw)]


def _same(a, b):
    return len(a) == len(b) and all(ka == kb and torch.equal(la, lb) for (ka, la), (kb, lb) in zip(a, b))


def test_a_url_reads_the_same_batches_as_the_folder(server, pipeline):
    _, url, _ = server
    for kw in ({}, {"rank": 1, "world_size": 2}, {"epoch": 1, "shuffle_buffer": 8}):
        assert _same(_epoch(url, **kw), _epoch(pipeline.shards, **kw)), kw
    braces = url + "video-{000000..000001}.tar"
    assert _same(_epoch(braces), _epoch(pipeline.shards))


def test_a_connection_dropped_mid_shard_is_retried_without_losing_or_repeating_a_sample(server, pipeline, capsys):
    srv, url, folder = server
    ShardHandler.cuts = {"video-000000.tar": ((folder / "video-000000.tar").stat().st_size // 2, 2)}
    got = _epoch(url, shuffle_buffer=0)
    assert _same(got, _epoch(pipeline.shards, shuffle_buffer=0))
    assert sum(len(k) for k, _ in got) == 16 and len({x for k, _ in got for x in k}) == 16  # each sample once
    out = capsys.readouterr().out
    assert "video-000000.tar: connection dropped after" in out and "retry 2 of 3" in out


def test_a_connection_that_keeps_dropping_is_an_error_naming_the_shard(server):
    srv, url, folder = server
    ShardHandler.cuts = {"video-000001.tar": (1000, 99)}
    with pytest.raises(ShardError, match=r"video-000001\.tar: connection failed 4 times after \d+ samples"):
        _epoch(url, shuffle_buffer=0)


def test_a_missing_shard_is_a_clear_error_before_training(server):
    srv, url, folder = server
    (folder / "video-000001.tar").unlink()
    with pytest.raises(ShardError, match=r"video-000001\.tar: missing \(HTTP 404; listed in manifest.json\)"):
        make_latent_loader(url, kind="video", batch_size=4)
    with pytest.raises(ShardError, match="manifest not found"):
        make_latent_loader(url + "nowhere/", kind="video", batch_size=4)


def test_training_from_the_url_matches_the_folder_and_resumes_exactly(server, pipeline, tmp_path):
    from scripts import train_diffusion

    _, url, _ = server
    common = ["--config", str(DIFF_TINY), "train.log_every=1", "train.checkpoint_every=2", "data.image_ratio=0.5"]
    runs = {}
    for name, shards, steps in (("local", pipeline.shards, [4]), ("url", url, [4]), ("url_resumed", url, [2, 4])):
        for n in steps:
            assert train_diffusion.main([*common, "--shards", str(shards), "--output-dir", str(tmp_path / name),
                                         "--max-steps", str(n)]) == 0  # fmt: skip
        runs[name] = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / name / "metrics.jsonl")]
    assert len(runs["local"]) == 4 and runs["url"] == runs["local"] and runs["url_resumed"] == runs["local"]
