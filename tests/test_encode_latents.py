"""encode_latents end to end with a tiny real FrameVAE: round trip, reruns, resume, awkward inputs."""

import json
import os
import shutil
import signal
import tarfile
from fractions import Fraction

import cv2
import numpy as np
import pytest
import torch

import scripts.encode_latents as enc
from autoencoder.config import VAEConfig
from autoencoder.model import FrameVAE, weights_hash
from autoencoder.video import encode_video
from data import encoding
from data.latents import make_latent_loader
from data.shards import load_manifest, verify_shards
from data.stats import un_whiten
from data.synthetic import make_synthetic_video
from data.transforms import resize_and_crop, to_tensor
from scripts import verify_shards as verify_cli

SYNTH = ["synthetic.num_videos=5", "synthetic.num_frames=8", "synthetic.size=32", "encode.size=32",
         "encode.clip_len=4", "encode.videos_per_shard=2", "encode.batch_size=3"]  # fmt: skip


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = VAEConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4,
                    mid_attention=False, norm_groups=8)  # fmt: skip
    return FrameVAE(cfg).save_pretrained(tmp_path_factory.mktemp("vae") / "export")


def encode(vae_dir, data, out, *extra, workers=0):
    argv = ["--autoencoder", str(vae_dir), "--data", str(data), "--output-dir", str(out),
            "--num-workers", str(workers), *extra]  # fmt: skip
    return enc.main(argv)


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_synthetic_round_trip(vae_dir, tmp_path):
    out = tmp_path / "shards"
    assert encode(vae_dir, "synthetic", out, *SYNTH) == 0
    m = load_manifest(out)
    assert m["totals"]["video_samples"] == 10 and m["totals"]["videos"] == 5 and m["totals"]["failures"] == 0
    assert [s["name"] for s in m["shards"]] == ["video-000000.tar", "video-000001.tar", "video-000002.tar"]
    assert m["latent_shape"] == [4, 16, 16] and m["clip_len"] == 4 and m["labels"] == ["circle", "square", "triangle"]
    assert m["autoencoder"]["weights_sha256"] == weights_hash(vae_dir)
    assert (out / "config.yaml").exists() and verify_shards(out).ok
    vae = FrameVAE.from_pretrained(vae_dir)
    loader = make_latent_loader(out, batch_size=4, use_mean=True, shuffle_buffer=0)
    seen = 0
    for batch in loader:
        for x, label, meta in zip(batch["latent"], batch["label"], batch["meta"]):
            index = int(meta["source"].split("/")[1])
            frames, lab = make_synthetic_video(index, num_frames=8, size=32, seed=0)
            clip = to_tensor(resize_and_crop(frames[meta["start"] : meta["start"] + 4], 32))[None]
            with torch.no_grad():
                direct, _ = encode_video(vae, clip, chunk_size=16)
            assert label == lab == meta["label"] and meta["stride"] == 1 and meta["fps"] == 8.0
            torch.testing.assert_close(un_whiten(x, loader.stats), direct[0], atol=2e-3, rtol=2e-3)  # float16
            seen += 1
    assert seen == 10
    # stats.json is the per-channel mean and std over every latent written (posterior means)
    means = np.concatenate([_npy(v) for e in m["shards"] for k, v in _members(out / e["name"]).items()
                            if k.endswith(".mean.npy")], axis=1)  # [C, sum of T, h, w]  # fmt: skip
    stats = json.loads((out / "stats.json").read_text())
    assert stats["count"] == means[0].size
    np.testing.assert_allclose(stats["mean"], means.mean(axis=(1, 2, 3)), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(stats["std"], means.std(axis=(1, 2, 3)), rtol=1e-3, atol=1e-3)


def test_rerun_is_byte_identical_and_resumes_after_interruption(vae_dir, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert encode(vae_dir, "synthetic", a, *SYNTH) == 0
    first = files(a)
    capsys.readouterr()
    assert encode(vae_dir, "synthetic", a, *SYNTH) == 0  # nothing to do
    assert "3 shards; 3 complete already" in capsys.readouterr().out
    assert files(a) == first
    shutil.copytree(a, b)
    (b / "video-000001.tar").rename(b / "video-000001.tar.tmp")  # killed between write and rename
    (b / "video-000002.tar").write_bytes(b"half a shard")  # or a torn file
    (b / "manifest.json").unlink()
    assert encode(vae_dir, "synthetic", b, *SYNTH) == 0
    assert "3 shards; 1 complete already" in capsys.readouterr().out
    again = files(b)
    assert again.keys() == first.keys()  # the .tmp was rewritten and renamed
    assert [k for k in first if again[k] != first[k]] == []
    assert verify_shards(b).ok
    # decoding in worker processes: the same samples in the same shards. Not byte-identical in
    # general: the main process then runs fewer intra-op threads, which changes float rounding.
    c = tmp_path / "c"
    assert encode(vae_dir, "synthetic", c, *SYNTH, workers=2) == 0
    for name in ("video-000000.tar", "video-000001.tar", "video-000002.tar"):
        x, y = _members(a / name), _members(c / name)
        assert x.keys() == y.keys()
        for k in x:
            if k.endswith(".npy"):
                np.testing.assert_allclose(_npy(x[k]), _npy(y[k]), atol=2e-3, rtol=2e-3)
            else:
                assert x[k] == y[k], k
    # other settings in the same folder: refuse instead of mixing shards
    assert encode(vae_dir, "synthetic", b, *SYNTH, "encode.clip_len=2") == 2
    assert "different encoding settings" in capsys.readouterr().err


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _npy(data):
    import io

    return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)


def _video(path, frames, size=(40, 30), fourcc="MJPG"):
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10.0, size)
    rng = np.random.default_rng(len(str(path)))
    for _ in range(frames):
        w.write(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    w.release()


def _awkward_folder(root):
    good, bad = set(), {}
    for cls in ("cl ass.a", "ünï"):
        (root / cls).mkdir(parents=True)
    _video(root / "cl ass.a" / "my clip.v1.avi", 9)
    _video(root / "ünï" / "vidéo ñ.mp4", 6, fourcc="mp4v")
    good |= {"cl ass.a/my clip.v1.avi", "ünï/vidéo ñ.mp4"}
    _video(root / "ünï" / "short.avi", 2)
    bad["ünï/short.avi"] = "clips"
    (root / "cl ass.a" / "corrupt.mp4").write_bytes(os.urandom(4096))
    (root / "cl ass.a" / "empty.avi").write_bytes(b"")
    (root / "ünï" / "notes.mkv").write_text("this is not a video")
    (root / "ünï" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(300))
    bad |= dict.fromkeys(["cl ass.a/corrupt.mp4", "cl ass.a/empty.avi", "ünï/notes.mkv", "ünï/broken.jpg"], "decode")
    rng = np.random.default_rng(0)
    images = {
        "cl ass.a/gray.png": rng.integers(0, 255, (20, 24), dtype=np.uint8),
        "cl ass.a/rgba img.png": rng.integers(0, 255, (24, 20, 4), dtype=np.uint8),
        "ünï/deep 16bit.png": rng.integers(0, 65535, (30, 30, 3), dtype=np.uint16),
        "ünï/plain.x.jpg": rng.integers(0, 255, (18, 40, 3), dtype=np.uint8),
    }
    for rel, img in images.items():
        ok, buf = cv2.imencode(os.path.splitext(rel)[1], img)
        (root / rel).write_bytes(buf.tobytes())
    with open(os.path.join(os.fsencode(root), b"cl ass.a", b"latin1 \xe9t\xe9.png"), "wb") as f:  # not UTF-8
        f.write(cv2.imencode(".png", images["ünï/plain.x.jpg"])[1].tobytes())
    good.add("cl ass.a/latin1 \udce9t\udce9.png")
    # a single-frame video (shorter than a clip), a variable-frame-rate mp4, tiny and very large frames
    _video(root / "ünï" / "one frame.avi", 1)
    bad["ünï/one frame.avi"] = "clips"
    _vfr_mp4(root / "cl ass.a" / "vfr.mp4", [0, 40, 200, 240, 600, 640, 660])
    _video(root / "cl ass.a" / "tiny.avi", 5, size=(6, 4))
    (root / "ünï" / "huge.png").write_bytes(cv2.imencode(".png", rng.integers(0, 255, (2160, 3840, 3), dtype=np.uint8))[1])
    good |= {"cl ass.a/vfr.mp4", "cl ass.a/tiny.avi", "ünï/huge.png"}
    # a file the OS refuses to open (see _refuse_locked), a folder symlink loop (visited once), and
    # a dangling link and a file link loop (both listed as failures)
    _video(root / "ünï" / "locked.avi", 6)
    bad["ünï/locked.avi"] = "decode"
    os.symlink(root, root / "cl ass.a" / "loop")
    os.symlink(root / "gone.mp4", root / "ünï" / "dangling.mp4")
    os.symlink(root / "ünï" / "self.mkv", root / "ünï" / "self.mkv")
    bad["ünï/dangling.mp4"] = bad["ünï/self.mkv"] = "decode"
    return good | set(images), bad


def _vfr_mp4(path, pts_ms):
    """H.264 mp4 whose frames are unevenly spaced in time (timestamps in ms)."""
    import av

    rng = np.random.default_rng(1)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for pts in pts_ms:
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def _refuse_locked(monkeypatch):
    """Running as root, chmod 0 does not stop reads: make the OS refuse one file instead (inherited by
    forked DataLoader workers). As another user, chmod 0 itself is used as well."""
    import builtins

    from data import video_io

    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if os.fsdecode(file).endswith("locked.avi"):
            raise PermissionError(13, "Permission denied", os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(video_io, "open", guarded, raising=False)


def test_awkward_inputs_are_encoded_or_listed(vae_dir, tmp_path, monkeypatch):
    good, bad = _awkward_folder(tmp_path / "data")
    (tmp_path / "data" / "ünï" / "locked.avi").chmod(0)
    _refuse_locked(monkeypatch)
    out = tmp_path / "shards"
    assert encode(vae_dir, tmp_path / "data", out, "encode.size=16", "encode.clip_len=4", workers=2) == 0
    failures = {f["relpath"]: f for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert {k: f["stage"] for k, f in failures.items()} == bad
    assert all(f["reason"] for f in failures.values())
    assert "permission denied" in failures["ünï/locked.avi"]["reason"]
    assert "frames" in failures["ünï/one frame.avi"]["reason"]
    assert all("broken symbolic link" in failures[k]["reason"] for k in ("ünï/dangling.mp4", "ünï/self.mkv"))
    sources = {}
    for entry in load_manifest(out)["shards"]:
        with tarfile.open(out / entry["name"]) as tar:
            for info in tar:
                if info.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(info).read())
                    sources.setdefault(meta["source"], []).append(meta)
    assert set(sources) == good  # every valid input encoded, nothing else
    assert len(sources["cl ass.a/my clip.v1.avi"]) == 2 and sources["ünï/deep 16bit.png"][0]["latent_shape"][1] == 1
    assert sources["cl ass.a/rgba img.png"][0]["orig_size"] == [24, 20]
    assert len(sources["cl ass.a/vfr.mp4"]) == 1 and sources["ünï/huge.png"][0]["orig_size"] == [2160, 3840]
    t = load_manifest(out)["totals"]
    assert t["videos"] + t["images"] + t["failures"] == t["inputs"] == len(good) + len(bad)
    assert t["video_samples"] == 5 and t["image_samples"] == 6
    assert verify_cli.main([str(out)]) == 0


def test_a_crashing_decoder_process_is_survived(vae_dir, tmp_path, monkeypatch):
    real = encoding.decode_input

    def segfault_on_square(spec, cfg, sc):  # runs in the forked DataLoader worker
        if spec.relpath.startswith("square/000001"):
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(spec, cfg, sc)

    monkeypatch.setattr(encoding, "decode_input", segfault_on_square)
    out = tmp_path / "shards"
    assert encode(vae_dir, "synthetic", out, *SYNTH, workers=2) == 0
    fails = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["relpath"] for f in fails] == ["square/000001"] and "crashed" in fails[0]["reason"]
    assert load_manifest(out)["totals"]["videos"] == 4 and verify_shards(out).ok


def test_clear_errors(vae_dir, tmp_path, capsys):
    assert encode(tmp_path / "no-vae", "synthetic", tmp_path / "o", *SYNTH) == 2
    assert "no-vae" in capsys.readouterr().err
    assert encode(vae_dir, "synthetic", tmp_path / "o", "encode.clip_lenn=3") == 2
    assert "encode.clip_lenn" in capsys.readouterr().err
    assert encode(vae_dir, tmp_path / "missing", tmp_path / "o") == 2
    assert "missing" in capsys.readouterr().err
    assert verify_cli.main([str(tmp_path / "o")]) == 1
    assert "manifest not found" in capsys.readouterr().out


def test_the_crash_suspect_is_never_an_input_decoded_already(monkeypatch):
    """After a worker dies the suspect (the first input not yet received) is decoded alone and
    remembered; it must never be one already remembered, or the retry loop would not progress."""
    monkeypatch.setattr(encoding, "decode_input", lambda spec, cfg, sc: {"name": spec.relpath})
    specs = [encoding.InputSpec("video", name, None) for name in "abcde"]
    session = encoding.DecodeSession(None, None, 0, known={"b": {"name": "b"}, "c": {"name": "c"}})
    suspects = []
    for result in session.results(specs):
        suspects.append((result["name"], session.next and session.next.relpath))
    assert suspects == [("a", "d"), ("b", "d"), ("c", "d"), ("d", "e"), ("e", None)]


def test_a_crash_is_told_by_the_exit_code_not_the_message(monkeypatch):
    """A worker killed by a signal is a WorkerCrash; a RuntimeError raised by a decoder in the main
    process (no workers) that merely mentions "DataLoader worker" is not."""

    def crash(spec, cfg, sc):
        if spec.relpath == "b":
            os.kill(os.getpid(), signal.SIGKILL)
        return {"name": spec.relpath}

    monkeypatch.setattr(encoding, "decode_input", crash)
    specs = [encoding.InputSpec("video", name, None) for name in "abc"]
    session, crashes = encoding.DecodeSession(None, None, 1), 0
    while True:  # the retry loop of scripts.encode_latents
        try:
            results = list(session.results(specs))
            break
        except RuntimeError:
            assert session.dead_worker == -signal.SIGKILL
            crashes += 1
            session.recover()  # the first input not received: b, or a when the crash beat it
    assert 1 <= crashes <= 2 and [r["name"] for r in (results[0], results[2])] == ["a", "c"]
    assert isinstance(results[1], encoding.Failure) and "crashed" in results[1].reason

    def liar(spec, cfg, sc):
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal")

    monkeypatch.setattr(encoding.InputDecoder, "__getitem__", lambda self, i: liar(None, None, None))
    with pytest.raises(RuntimeError) as info:
        list(encoding.DecodeSession(None, None, 0).results(specs))
    assert not isinstance(info.value, encoding.WorkerCrash)


@pytest.mark.slow
def test_encoding_killed_mid_run_resumes_to_the_same_bytes(vae_dir, tmp_path):
    """A real SIGKILL of `python -m scripts.encode_latents` once its second shard is on disk; the
    same command run again keeps the finished shards and ends byte-identical to an uninterrupted run."""
    import time

    from helpers import run_script, start_script

    args = ["--autoencoder", vae_dir, "--data", "synthetic", "--num-workers", "0", "synthetic.num_videos=24",
            "synthetic.num_frames=8", "synthetic.size=32", "encode.size=32", "encode.clip_len=4",
            "encode.videos_per_shard=1", "encode.batch_size=2"]  # fmt: skip
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = run_script("encode_latents", *args, "--output-dir", whole)
    assert done.returncode == 0, done.stderr[-2000:]
    proc = start_script("encode_latents", *args, "--output-dir", killed)
    deadline = time.time() + 120
    while not (killed / "video-000001.meta.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "manifest.json").exists()  # killed mid-run
    finished = sorted(p.name.replace(".meta.json", ".tar") for p in killed.glob("video-*.meta.json"))  # sidecar last
    assert 2 <= len(finished) < 24
    before = {name: (killed / name).read_bytes() for name in finished}
    again = run_script("encode_latents", *args, "--output-dir", killed)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"24 shards; {len(finished)} complete already" in again.stdout
    assert all((killed / name).read_bytes() == data for name, data in before.items())  # kept, not redone
    assert files(killed) == files(whole) and not list(killed.glob("*.tmp"))
