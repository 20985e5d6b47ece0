"""Text-to-video: the frozen encoder, embeddings in shards, cross-attention, text dropout, guidance on
text, prompts at sampling time and the encoder checks (issue 14)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from data.latents import make_latent_loader
from diffusion.config import UNetConfig
from diffusion.sampling import classifier_free_guidance
from diffusion.text import TextEncoderError, build_tiny_text_encoder, load_text_encoder
from diffusion.unet3d import UNet3D
from tests.helpers import AE_TINY, DIFF_TINY, ENCODE_DEMO, run_script

TEXT_ARGS = ["text.max_length=16", "data.class_conditional=false"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """Captioned synthetic videos -> tiny VAE -> shards with caption embeddings -> a 3-step text model."""
    from scripts import encode_latents, make_synthetic, train_autoencoder, train_diffusion

    root = tmp_path_factory.mktemp("text")
    enc = build_tiny_text_encoder(root / "te", width=32, layers=1, heads=2, max_length=16)
    data, vae, shards, diff = root / "data", root / "vae", root / "shards", root / "diff"
    assert make_synthetic.main(["--output-dir", str(data), "--num-videos", "6", "--frames", "8", "--size", "32"]) == 0
    (data / "captions.jsonl").write_text(json.dumps({"path": "gone/x.mp4", "caption": "a missing file"}) + "\n")
    assert train_autoencoder.main(["--config", str(AE_TINY), "--data", str(data), "--output-dir", str(vae),
                                   "--max-steps", "1", "data.frames_per_video=2"]) == 0  # fmt: skip
    assert encode_latents.main(["--autoencoder", str(vae / "export"), "--data", str(data), "--output-dir", str(shards),
                                "--config", str(ENCODE_DEMO), "encode.num_workers=0", "encode.clip_len=4",
                                f"encode.text_encoder={root / 'te'}", "encode.text_max_length=16"]) == 0  # fmt: skip
    assert train_diffusion.main(["--config", str(DIFF_TINY), "--shards", str(shards), "--output-dir", str(diff),
                                 "--max-steps", "2", f"text.encoder={root / 'te'}", *TEXT_ARGS, "sample.every=2",
                                 "sample.num=2", "sample.steps=2", "sample.prompts=[a red circle moves up]",
                                 f"sample.autoencoder={vae / 'export'}"]) == 0  # fmt: skip
    return SimpleNamespace(root=root, enc=enc, data=data, vae=vae / "export", shards=shards, export=diff / "export")


def test_embeddings_round_trip_through_shards_bit_exactly(text_run):
    n = 0
    for batch in make_latent_loader(text_run.shards, kind="video", batch_size=4, shuffle_buffer=0):
        for i, meta in enumerate(batch["meta"]):
            emb, mask = text_run.enc.encode(meta["captions"])
            row = meta["captions"].index(batch["caption"][i])
            assert torch.equal(batch["text"][i], emb[row].half().float())  # stored float16, nothing else lost
            assert torch.equal(batch["text_mask"][i], mask[row])
            n += 1
    assert n == 12  # 6 videos x 2 clips


def test_caption_problems_reach_failures_and_manifest(text_run):
    rows = [json.loads(line) for line in (text_run.shards / "failures.jsonl").read_text().splitlines()]
    assert [(r["relpath"], r["stage"]) for r in rows] == [("gone/x.mp4", "caption")]
    assert "not in the data folder" in rows[0]["reason"]
    text = json.loads((text_run.shards / "manifest.json").read_text())["text"]
    assert text["captioned_files"] == 6 and text["caption_problems"] == 1
    assert text["text_encoder"]["weights_sha256"] == text_run.enc.fingerprint()["weights_sha256"]


def test_text_dropout_happens_at_its_rate_and_with_the_labels():
    from scripts.train_diffusion import _conditions

    class Fixed:
        def __call__(self, batch):
            return torch.ones(len(batch["label"]), 3, 4), torch.ones(len(batch["label"]), 3, dtype=torch.bool)

    cfg = SimpleNamespace(cond=SimpleNamespace(class_dropout=0.2, text_dropout=0.2), model=SimpleNamespace(num_classes=3))
    g = torch.Generator().manual_seed(0)
    dropped_text = dropped_both = 0
    for _ in range(200):
        kw = _conditions({"label": torch.zeros(8, dtype=torch.long)}, cfg, g, Fixed(), "cpu")
        no_text = ~kw["text_mask"].any(1)
        dropped_text += int(no_text.sum())
        dropped_both += int((no_text & (kw["class_labels"] == 3)).sum())
    assert 0.15 < dropped_text / 1600 < 0.25  # fails if dropout never (or always) happens
    assert dropped_both == dropped_text  # one draw: labels and text are dropped together


def _text_model(seed=0, text_dim=32, **extra):
    torch.manual_seed(seed)
    cfg = UNetConfig(in_channels=4, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                     head_dim=8, norm_groups=8, text_dim=text_dim, frame_conditioning=False, **extra)
    model = UNet3D(cfg).eval()
    with torch.no_grad():  # zero-initialised projections would hide the text at init
        for name, p in model.named_parameters():
            if name.endswith(("out_proj.weight", "text_pool.weight", "out_conv.weight", "conv2.weight")):
                p.normal_(0, 0.05)
    return model


def test_cross_attention_uses_the_text_and_null_rows_are_the_null_text():
    model = _text_model()
    x, t = torch.randn(2, 4, 3, 8, 8), torch.tensor([500, 500])
    a, b = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        out_a = model(x, t, text=torch.cat([a, a]), text_mask=mask)
        out_b = model(x, t, text=torch.cat([a, b]), text_mask=mask)
        null = model(x, t, text=torch.cat([a, b]), text_mask=torch.zeros(2, 5, dtype=torch.bool))
        none = model(x, t)
    assert torch.equal(out_a[0], out_b[0]) and not torch.allclose(out_a[1], out_b[1], atol=1e-4)
    assert torch.allclose(null, none, atol=1e-6)  # all-False mask == no text: what dropout trains
    masked = torch.cat([a[:, :2], torch.randn(1, 3, 32)], 1)  # padding positions do not matter
    m2 = torch.tensor([[1, 1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        p1 = model(x[:1], t[:1], text=masked, text_mask=m2)
        p2 = model(x[:1], t[:1], text=torch.cat([a[:, :2], torch.zeros(1, 3, 32)], 1), text_mask=m2)
    assert torch.allclose(p1, p2, atol=1e-6)


def test_pooled_text_is_standardised_by_the_running_statistics_of_training_captions():
    model = _text_model(text_pool_norm=True).train()
    assert UNetConfig(text_dim=32).to_dict().get("text_pool_norm") is None  # off: config.json as before
    assert not any(k.startswith("text_pool_") for k in _text_model().state_dict())  # off: no new buffers
    seen = []
    fed = model.text_pool.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    gen = torch.Generator().manual_seed(1)
    common = torch.randn(32, generator=gen) * 3  # a large direction every caption shares, as a frozen encoder's
    rows = []
    for _ in range(4):
        text = common + torch.randn(3, 5, 32, generator=gen) * torch.linspace(0.1, 2, 32)
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)  # row 3: null
        model(torch.randn(3, 4, 2, 8, 8, generator=gen), torch.tensor([10, 500, 900]), text=text, text_mask=mask)
        rows += [text[0, :3].mean(0), text[1].mean(0)]  # the pooled captions, by hand; the null row is not one
    rows = torch.stack(rows).double()
    assert int(model.text_pool_count) == 8
    assert torch.allclose(model.text_pool_mean.double(), rows.mean(0), atol=1e-5)
    assert torch.allclose(model.text_pool_var.double(), rows.var(0, unbiased=False), atol=1e-4)
    last = (rows[-2:] - rows.mean(0)) / (rows.var(0, unbiased=False) + 1e-6).sqrt()
    assert torch.allclose(seen[-1][:2].double(), last, atol=1e-4) and torch.equal(seen[-1][2], torch.zeros(32))
    assert (seen[-1][:2].abs().mean() > 0.3) and (seen[-1][:2].abs().max() < 5)  # unit scale, common part gone

    model.eval()  # frozen: eval forwards use the statistics and do not change them
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("text_pool_")}
    x, t = torch.randn(2, 4, 2, 8, 8), torch.tensor([300, 300])
    text, mask = common + torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        out = model(x, t, text=text, text_mask=mask)
        null = model(x, t, text=text, text_mask=torch.zeros_like(mask))
        none = model(x, t)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.allclose(null, none, atol=1e-6)  # the null text stays the null text
    fed.remove()
    reloaded = _text_model(seed=5, text_pool_norm=True)
    reloaded.load_state_dict(model.state_dict())  # the statistics travel with the weights
    with torch.no_grad():
        assert torch.equal(reloaded(x, t, text=text, text_mask=mask), out)


def test_model_without_text_is_unchanged():
    cfg = UNetConfig(in_channels=4, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                     head_dim=8, norm_groups=8)
    model = UNet3D(cfg)
    assert "text_dim" not in cfg.to_dict()
    assert not any("cross_attn" in k or "null_token" in k or "text_pool" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="no text conditioning"):
        model(torch.randn(1, 4, 2, 8, 8), torch.tensor([3]), text=torch.randn(1, 4, 32))


def test_guidance_on_text_is_uncond_plus_scale_times_difference_in_one_call():
    model = _text_model()
    calls = []

    def counted(x, t, **kw):
        calls.append(x.shape[0])
        return model(x, t, **kw)

    x, t = torch.randn(2, 4, 2, 8, 8), torch.tensor([400, 400])
    text, mask = torch.randn(2, 6, 32), torch.ones(2, 6, dtype=torch.bool)
    neg = (torch.randn(1, 6, 32), torch.ones(1, 6, dtype=torch.bool))
    with torch.no_grad():
        guided = classifier_free_guidance(counted, 4.0)(x, t, text=text, text_mask=mask)
        assert calls == [4]  # cond and uncond halves in one batched call
        cond = model(x, t, text=text, text_mask=mask)
        uncond = model(x, t, text=text, text_mask=torch.zeros_like(mask))
        neg_out = model(x, t, text=neg[0].expand(2, -1, -1), text_mask=neg[1].expand(2, -1))
        with_neg = classifier_free_guidance(model, 4.0, negative_text=neg)(x, t, text=text, text_mask=mask)
    assert torch.allclose(guided, uncond + 4.0 * (cond - uncond), atol=1e-5)
    assert torch.allclose(with_neg, neg_out + 4.0 * (cond - neg_out), atol=1e-5)


def test_captions_longer_than_max_length_are_reported_where_they_are_cut(text_run):
    enc = text_run.enc  # max_length 16; byte-level: one token per byte plus EOS
    a, b = "a red circle moves to the upper left", "a red circle moves to the lower left"
    ea, eb = enc.encode([a, b])[0]
    assert torch.equal(ea, eb)  # what the warning is about: the words past the limit never reach the model
    assert enc.truncated([a, "a red", a]) == [(a, len(a) + 1)]
    assert enc.truncation_warning(["a red", "up"], "captions", "text.max_length") is None
    line = enc.truncation_warning([a, b], "captions", "encode.text_max_length")
    assert line.startswith("2 captions longer than encode.text_max_length=16 tokens") and f"at least {len(a) + 1}" in line
    text = json.loads((text_run.shards / "manifest.json").read_text())["text"]
    captions = {line.strip() for p in text_run.data.rglob("*.txt") for line in p.read_text().splitlines() if line.strip()}
    assert text["truncated_captions"] == sum(len(c.encode()) + 1 > 16 for c in captions) > 0


def test_word_level_tiny_encoder_has_a_token_per_word_and_reloads_the_same(text_run, tmp_path, capsys):
    from data.synthetic import caption_words

    enc = build_tiny_text_encoder(tmp_path / "words", width=16, layers=1, heads=2, max_length=16, words=caption_words())
    a, b = "a red circle moves to the upper left", "A red circle moves to the LOWER left"
    ids = enc.tokenizer(a)["input_ids"]
    assert enc.tokenizer.convert_ids_to_tokens(ids) == [*a.split(), "</s>"]  # whole words, EOS appended
    (ea, eb), mask = enc.encode([a, b])
    assert mask.sum(1).tolist() == [9, 9] and not enc.truncated([a, b])  # 9 tokens where bytes took 37
    assert not torch.allclose(ea, eb)  # "upper" and "lower" are different tokens
    again = load_text_encoder(str(tmp_path / "words"), 16)  # as an export or the shards' encoder loads it
    assert torch.equal(again.encode([a, b])[0], enc.encode([a, b])[0])
    assert again.fingerprint() == enc.fingerprint() and enc.fingerprint()["config"]["vocab_size"] == 3 + len(caption_words())
    # a word outside the closed vocabulary is named (scripts.sample and encode_latents warn with it)
    assert enc.unknown_words(["a purple circle moves sideways", a]) == ["purple", "sideways"]
    assert enc.unknown_words([a, b]) == [] and enc.unknown_words_warning([a, b], "prompts") is None
    assert enc.unknown_words_warning(["a purple circle"], "prompts").startswith(
        "the text encoder has no token for 1 word(s) of the prompts ('purple')")
    assert text_run.enc.unknown_words(["a purple circle"]) == []  # byte-level spells any word
    # both kinds of warning in one list, the cut captions first (what the three call sites print)
    long = "a red circle moves to the upper left " * 2 + "purple"
    both = enc.caption_warnings([a, long], "captions", "text.max_length")
    assert len(both) == 2 and both[0].startswith("1 captions longer than text.max_length=16") and "'purple'" in both[1]
    assert enc.caption_warnings([a, b], "captions", "text.max_length") == []
    # training that encodes captions on the fly (no embeddings in the shards) names them too
    from scripts.train_diffusion import CaptionText

    emb, m = CaptionText(enc)({"caption": [a, "a purple circle", None]})
    assert emb.shape == (3, 16, 16) and m.sum(1).tolist() == [9, 4, 0]
    assert "no token for 1 word(s) of the captions ('purple')" in capsys.readouterr().out
    CaptionText(enc)({"caption": [a, b]})
    assert "warning" not in capsys.readouterr().out
    # the quality driver's --text-tokenizer words builds its encoder this way
    from scripts.quality import BUILTIN_TEXT_LENGTH, builtin_text_encoder

    builtin_text_encoder(tmp_path / "q", "words")
    q = load_text_encoder(str(tmp_path / "q"), BUILTIN_TEXT_LENGTH)
    assert q.tokenizer.convert_ids_to_tokens(q.tokenizer("a cyan square moves down")["input_ids"])[:5] == \
        ["a", "cyan", "square", "moves", "down"]


def test_prompts_change_samples_and_same_prompt_and_seed_reproduce(text_run, tmp_path):
    from safetensors import safe_open

    common = ["--checkpoint", text_run.export, "--num-samples", "1", "--steps", "2", "--format", "mp4",
              "--autoencoder", text_run.vae]
    runs = {}
    for name, prompt in (("a", "a red circle moves up"), ("a2", "a red circle moves up"), ("b", "a blue square moves down")):
        r = run_script("sample", *common, "--prompt", prompt, "--output-dir", tmp_path / name)
        assert r.returncode == 0, r.stderr
        assert "prompts longer than the model's text.max_length=16 tokens lose their end" in r.stderr
        (lat,) = (tmp_path / name).glob("*.safetensors")
        with safe_open(str(lat), framework="pt") as f:
            runs[name] = (f.get_tensor("latent"), json.loads(f.metadata()["lvd"]), lat.name)
    assert torch.equal(runs["a"][0], runs["a2"][0])
    assert not torch.equal(runs["a"][0], runs["b"][0])
    assert runs["a"][1]["prompt"] == "a red circle moves up"
    assert runs["a"][2] == "sample-000-a-red-circle-moves-up.safetensors"
    assert (tmp_path / "a" / "sample-000-a-red-circle-moves-up.mp4").is_file()
    # a negative prompt replaces the null text in guidance: another sample, recorded where it ran
    r = run_script("sample", *common, "--prompt", "a red circle moves up", "--negative-prompt", "a blue square",
                   "--output-dir", tmp_path / "neg")
    assert r.returncode == 0, r.stderr
    (lat,) = (tmp_path / "neg").glob("*.safetensors")
    with safe_open(str(lat), framework="pt") as f:
        assert not torch.equal(f.get_tensor("latent"), runs["a"][0])
        assert json.loads(f.metadata()["lvd"])["negative_prompt"] == "a blue square"
    assert yaml.safe_load((tmp_path / "neg" / "config.yaml").read_text())["negative_prompt"] == "a blue square"
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["negative_prompt"] == ""
    r = run_script("sample", *common, "--output-dir", tmp_path / "none")
    assert r.returncode != 0 and "text-conditioned" in r.stderr


def test_another_encoder_is_refused_by_training_and_by_the_export(text_run, tmp_path):
    build_tiny_text_encoder(tmp_path / "other", width=32, layers=1, heads=2, seed=1, max_length=16)
    r = run_script("train_diffusion", "--config", DIFF_TINY, "--shards", text_run.shards, "--output-dir", tmp_path / "d",
                   "--max-steps", "1", f"text.encoder={tmp_path / 'other'}", *TEXT_ARGS)
    assert r.returncode != 0 and "manifest.json: the shards used text encoder" in r.stderr, r.stderr
    import shutil

    export = tmp_path / "export"
    shutil.copytree(text_run.export, export)
    shutil.rmtree(export / "text_encoder")
    shutil.copytree(tmp_path / "other", export / "text_encoder")
    r = run_script("sample", "--checkpoint", export, "--num-samples", "1", "--steps", "1", "--prompt", "x",
                   "--output-dir", tmp_path / "s")
    assert r.returncode != 0 and "replaced?" in r.stderr, r.stderr


def test_missing_or_foreign_encoder_gives_a_clear_error(tmp_path):
    with pytest.raises(TextEncoderError, match="cannot read its config"):
        load_text_encoder(str(tmp_path / "nowhere"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(TextEncoderError, match="not supported"):
        load_text_encoder(str(tmp_path / "bert"))
    enc = build_tiny_text_encoder(tmp_path / "te", width=16, layers=1, heads=2)
    (tmp_path / "te" / "model.safetensors").rename(tmp_path / "te" / "pytorch_model.bin")  # only a pickle left
    with pytest.raises(TextEncoderError, match="safetensors only"):
        load_text_encoder(str(tmp_path / "te"))
    assert enc.width == 16 and np.isfinite(enc.encode(["x"])[0].numpy()).all()


def test_periodic_samples_carry_their_prompt(text_run):
    from scripts.runtime.generation import load_latent_file

    lat = sorted((text_run.export.parent / "samples").glob("step*.safetensors"))
    assert len(lat) == 2 and all(load_latent_file(p)[1]["prompt"] == "a red circle moves up" for p in lat)
    assert len(list((text_run.export.parent / "samples").glob("step*.mp4"))) == 2


def test_caption_text_only_shards_are_encoded_by_the_trainer(text_run, tmp_path, capsys):
    """Without encode.text_encoder the shards hold the captions as text; the trainer encodes them
    (and says when they are longer than text.max_length)."""
    from data.shards import load_manifest
    from scripts import encode_latents, train_diffusion

    shards = tmp_path / "shards"
    assert encode_latents.main(["--autoencoder", str(text_run.vae), "--data", str(text_run.data), "--output-dir",
                                str(shards), "--config", str(ENCODE_DEMO), "encode.num_workers=0",
                                "encode.clip_len=4"]) == 0  # fmt: skip
    batch = next(iter(make_latent_loader(shards, kind="video", batch_size=4, shuffle_buffer=0)))
    assert "text" not in batch and all(batch["caption"])
    assert load_manifest(shards)["text"]["text_encoder"] is None
    assert train_diffusion.main(["--config", str(DIFF_TINY), "--shards", str(shards), "--output-dir",
                                 str(tmp_path / "d"), "--max-steps", "1", f"text.encoder={text_run.root / 'te'}",
                                 *TEXT_ARGS]) == 0  # fmt: skip
    assert "captions longer than text.max_length=16 tokens lose their end" in capsys.readouterr().out
    assert (tmp_path / "d" / "export" / "text_encoder" / "model.safetensors").is_file()
    # resuming that run with another encoder is refused: the checkpoint records the encoder
    build_tiny_text_encoder(tmp_path / "other", width=32, layers=1, heads=2, seed=1, max_length=16)
    r = run_script("train_diffusion", "--config", DIFF_TINY, "--shards", shards, "--output-dir", tmp_path / "d",
                   "--max-steps", "2", f"text.encoder={tmp_path / 'other'}", *TEXT_ARGS)
    assert r.returncode != 0 and "different text_encoder" in r.stderr, r.stderr


def test_prompt_with_an_init_video(text_run, tmp_path):
    video = sorted(text_run.data.rglob("*.mp4"))[0]
    r = run_script("sample", "--checkpoint", text_run.export, "--autoencoder", text_run.vae, "--num-samples", "1",
                   "--steps", "2", "--init-video", video, "--known-frames", "2", "--frames", "6", "--prompt",
                   "a green square moves left", "--sampler", "ddim", "--output-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    (lat,) = tmp_path.glob("*.safetensors")
    assert "a-green-square" in lat.name


def _tiny_clip(folder):
    """A CLIP text model with a character-level BPE vocabulary (no merges): built in-process."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {t: i for i, t in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(0)
    end = vocab["<|endoftext|>"]
    model = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=32,
                                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=end, pad_token_id=end))
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def test_a_clip_text_model_loads_and_conditions_the_unet(tmp_path):
    _tiny_clip(tmp_path / "clip")
    enc = load_text_encoder(str(tmp_path / "clip"), max_length=16)
    emb, mask = enc.encode(["a red circle", "a blue square moves"])
    assert enc.fingerprint()["model_type"] == "clip_text_model" and enc.width == 32
    assert emb.shape == (2, 16, 32) and mask.sum(1).tolist() == [12, 16]  # one token per character and word end, truncated at 16
    model = _text_model(text_dim=enc.width)
    with torch.no_grad():
        out = model(torch.randn(2, 4, 2, 8, 8), torch.tensor([10, 10]), text=emb, text_mask=mask)
    assert torch.isfinite(out).all()


def test_images_carry_captions_into_joint_training(text_run, tmp_path):
    """Image shards hold their captions' embeddings too; a text model trains on clips and images."""
    import shutil

    from data.video_io import write_png
    from scripts import encode_latents, train_diffusion

    data = tmp_path / "data"
    for video in sorted(text_run.data.rglob("*.mp4"))[:3]:
        (data / video.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(video, data / video.parent.name / video.name)
        shutil.copy(video.with_suffix(".txt"), data / video.parent.name / video.with_suffix(".txt").name)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        write_png(data / "circle" / f"still_{i}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        rows.append(json.dumps({"path": f"circle/still_{i}.png", "caption": f"a still picture number {i}"}))
    (data / "captions.jsonl").write_text("\n".join(rows) + "\n")
    shards = tmp_path / "shards"
    assert encode_latents.main(["--autoencoder", str(text_run.vae), "--data", str(data), "--output-dir", str(shards),
                                "--config", str(ENCODE_DEMO), "encode.num_workers=0", "encode.clip_len=4",
                                f"encode.text_encoder={text_run.root / 'te'}", "encode.text_max_length=16"]) == 0
    images = next(iter(make_latent_loader(shards, kind="image", batch_size=4, shuffle_buffer=0)))
    assert sorted(images["caption"]) == [f"a still picture number {i}" for i in range(4)]
    assert images["text"].shape == (4, 16, 32) and images["text_mask"].any(1).all()
    assert train_diffusion.main(["--config", str(DIFF_TINY), "--shards", str(shards), "--output-dir",
                                 str(tmp_path / "d"), "--max-steps", "1", f"text.encoder={text_run.root / 'te'}",
                                 "data.image_ratio=1.0", *TEXT_ARGS]) == 0  # fmt: skip
    assert (tmp_path / "d" / "export" / "model.safetensors").is_file()
