"""Frozen text encoders for text-to-video: a Hugging Face `transformers` T5 encoder or CLIP text model,
named by a hub id or a local folder, with its tokenizer and a fixed token length.

    enc = load_text_encoder("google/t5-v1_1-base", max_length=32)   # or a local folder
    emb, mask = enc.encode(["a red circle moves to the left"])      # [N, L, D] float32, [N, L] bool

Weights are read from safetensors only (`use_safetensors=True`: a folder holding only pickled
`pytorch_model.bin` weights is refused, keeping the project's no-pickle rule). `fingerprint()`
(name, model type, config, weights sha256, width, max length) goes into the shard manifest and the
diffusion export; `check_same_encoder` turns a mismatch into a clear error.

Tests and the demo never download: `build_tiny_text_encoder` writes a small seeded T5 encoder with
ByT5's byte-level tokenizer (no vocabulary file), or with a word-level tokenizer over a given word
list (`words=`: one token per word, as a pretrained tokenizer gives common words), to a folder,
which then loads like any other."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

FINGERPRINT_FILE = "lvd_text_encoder.json"  # written beside the weights by `save`
T5_TYPES = ("t5", "mt5", "umt5")
CLIP_TYPES = ("clip", "clip_text_model")


class TextEncoderError(ValueError):
    """The text encoder cannot be loaded, or is not the one the shards / export were made with."""


@dataclass
class TextConfig:
    """The `text` section of stage-2 configs: which encoder conditions the model ("" = no text)."""

    encoder: str = ""  # a Hugging Face hub id or a local folder (config.json + safetensors + tokenizer)
    max_length: int = 32  # tokens per caption (padded / truncated)


def _weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict (sorted names, dtype, shape, bytes): the same for a hub copy and a
    saved folder of the same weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _jsonable(config: dict) -> dict:
    drop = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "_attn_implementation_autoset"}
    return {k: v for k, v in sorted(config.items()) if k not in drop and isinstance(v, (int, float, str, bool, list, type(None)))}


class FrozenTextEncoder:
    """A loaded encoder in eval mode with no gradients; `encode` pads every caption to max_length."""

    def __init__(self, model, tokenizer, name: str, max_length: int):
        self.model, self.tokenizer, self.name, self.max_length = model.eval().requires_grad_(False), tokenizer, name, max_length
        cfg = model.config
        self.model_type = cfg.model_type
        self.width = int(getattr(cfg, "d_model", None) or cfg.hidden_size)
        self._sha = _weights_sha256(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> FrozenTextEncoder:
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings [N, max_length, width] float32 and the token mask [N, max_length] bool."""
        if isinstance(texts, str):
            texts = [texts]
        tok = self.tokenizer(list(texts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return out.float().cpu(), mask.bool().cpu()

    def token_count(self, text: str) -> int:
        """Tokens `text` takes before truncation (special tokens included)."""
        return len(self.tokenizer(text, truncation=False)["input_ids"])

    def truncated(self, texts) -> list[tuple[str, int]]:
        """(text, its token count) for each distinct text longer than max_length: `encode` cuts its end
        off, so words there (e.g. a byte-level tokenizer's "... to the upper left") never reach the model."""
        counts = ((t, self.token_count(t)) for t in dict.fromkeys(texts))
        return [(t, n) for t, n in counts if n > self.max_length]

    def unknown_words(self, texts) -> list[str]:
        """The words of `texts` the tokenizer can only map to its unknown token (a closed word-level
        vocabulary, e.g. the built-in encoder's with `words=`): such words never reach the model. Empty
        for byte-level and subword tokenizers, which spell any word."""
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is None or not getattr(self.tokenizer, "is_fast", False):
            return []  # ByT5 (slow, byte-level) spells every string; no offsets to name words by
        found = []
        for text in dict.fromkeys(t for t in texts if t):
            tok = self.tokenizer(text, truncation=False, return_offsets_mapping=True, add_special_tokens=False)
            found += [text[a:b] for i, (a, b) in zip(tok["input_ids"], tok["offset_mapping"]) if i == unk]
        return list(dict.fromkeys(found))

    def unknown_words_warning(self, texts, what: str) -> str | None:
        """One readable line naming the words of `texts` (e.g. "prompts") that reach the model only as
        the unknown token (`unknown_words`), else None."""
        unknown = self.unknown_words(texts)
        if not unknown:
            return None
        return (f"the text encoder has no token for {len(unknown)} word(s) of the {what} "
                f"({', '.join(map(repr, unknown[:8]))}): they reach the model as its unknown token")

    def truncation_warning(self, texts, what: str, key: str, advice: str = "", cut=None) -> str | None:
        """One readable line when some of `texts` are longer than max_length, else None (`cut`:
        `truncated(texts)` when the caller has it already)."""
        cut = self.truncated(texts) if cut is None else cut
        if not cut:
            return None
        text, n = max(cut, key=lambda tn: tn[1])
        advice = advice or f"raise {key} to at least {n} to keep them whole"
        return (f"{len(cut)} {what} longer than {key}={self.max_length} tokens lose their end (the longest, "
                f"{n} tokens: {text!r}); {advice}")

    def caption_warnings(self, texts, what: str, key: str, advice: str = "", cut=None) -> list[str]:
        """The readable warnings about `texts` (e.g. "prompts", "captions"): those cut short at `key`
        (`truncation_warning`), then words that reach the model only as the unknown token
        (`unknown_words_warning`); empty when neither applies."""
        lines = (self.truncation_warning(texts, what, key, advice, cut=cut), self.unknown_words_warning(texts, what))
        return [w for w in lines if w]

    def fingerprint(self) -> dict:
        return {"name": self.name, "model_type": self.model_type, "config": _jsonable(self.model.config.to_dict()),
                "weights_sha256": self._sha, "width": self.width, "max_length": self.max_length}

    def save(self, folder) -> Path:
        """The encoder as a loadable folder (safetensors + tokenizer + fingerprint), e.g. in an export."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        (folder / FINGERPRINT_FILE).write_text(json.dumps(self.fingerprint(), indent=2, sort_keys=True))
        return folder


def load_text_encoder(name: str, max_length: int = 32, device="cpu") -> FrozenTextEncoder:
    """A T5 encoder or CLIP text model from a local folder or the Hugging Face hub (hub ids are
    downloaded once into the Hugging Face cache; set HF_HUB_OFFLINE=1 to forbid it)."""
    if not name:
        raise TextEncoderError("no text encoder named (text.encoder is empty)")
    if max_length < 1:
        raise TextEncoderError(f"text.max_length must be >= 1, got {max_length}")
    from transformers import AutoConfig, AutoTokenizer, CLIPTextModel, T5EncoderModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    local = Path(name).is_dir()
    where = f"folder {name}" if local else f"hub id {name!r}"
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError) as e:
        hint = "" if local else " (not a local folder; a hub id needs the network or the Hugging Face cache)"
        raise TextEncoderError(f"text encoder {where}: cannot read its config{hint}: {e}") from None
    if config.model_type in T5_TYPES:
        cls = T5EncoderModel
    elif config.model_type in CLIP_TYPES:
        cls = CLIPTextModel
    else:
        raise TextEncoderError(f"text encoder {where}: model type {config.model_type!r} is not supported "
                               f"(use a T5 encoder or a CLIP text model)")
    try:
        model = cls.from_pretrained(name, local_files_only=local, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError) as e:
        raise TextEncoderError(f"text encoder {where}: cannot load weights (safetensors only) or tokenizer: {e}") from None
    return FrozenTextEncoder(model, tokenizer, name, max_length).to(device)


def word_level_tokenizer(words):
    """A fast tokenizer with one token per word of `words` (lower-cased, split on whitespace and
    punctuation), "<pad>" 0, "</s>" 1 (appended, as T5's) and "<unk>" 2 for any other word; saved and
    loaded by `transformers` like any tokenizer (tokenizer.json)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for piece in sorted({p for w in words for p, _ in split.pre_tokenize_str(str(w).lower())}):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = split
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_tiny_text_encoder(folder, *, width: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
                            max_length: int = 32, words=None) -> FrozenTextEncoder:
    """A small random T5 encoder (seeded), saved to `folder`: the tests' and the demo's stand-in for a
    pretrained encoder (nothing is downloaded). Its tokenizer is ByT5's byte-level one (one token per
    byte), or with `words` (an iterable of words or phrases) a word-level one over them: a whole word
    per token, as a pretrained tokenizer gives common words, so its tokens are not spelled out byte by
    byte through random layers (README "Text-to-video")."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = ByT5Tokenizer() if words is None else word_level_tokenizer(words)
    vocab_size = 384 if words is None else len(tokenizer)
    config = T5Config(vocab_size=vocab_size, d_model=width, d_kv=width // heads, d_ff=2 * width, num_layers=layers,
                      num_heads=heads, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    enc = FrozenTextEncoder(model, tokenizer, str(folder), max_length)
    enc.save(folder)
    return load_text_encoder(str(folder), max_length)


def check_same_encoder(expected: dict | None, found: dict | None, what: str) -> None:
    """A clear error when `found` (e.g. the manifest's encoder) is not `expected` (the configured one):
    the weights hash decides; names may differ (a hub id and its downloaded folder are the same)."""
    if not expected or not found:
        return
    for key in ("weights_sha256", "width", "max_length"):
        if expected.get(key) != found.get(key):
            raise TextEncoderError(
                f"{what} used text encoder {found.get('name')!r} ({key} {str(found.get(key))[:16]}), but this run's is "
                f"{expected.get('name')!r} ({key} {str(expected.get(key))[:16]}): use the same encoder (text.encoder, "
                f"text.max_length) or re-encode")
