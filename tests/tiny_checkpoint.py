"""A tiny checkpoint with random weights, the demo's architecture (har_ref/demo/tiny.py::tiny_config) and a
tokenizer trained on given texts: the fixture of the tests (conftest.py::tiny_weights) and benchmarks."""
from __future__ import annotations

from pathlib import Path

import torch

from har_ref.demo.tiny import tiny_config
from har_ref.demo.tokenizer_training import train_clip_bpe, train_sentencepiece
from har_ref.model.dual_encoder import DualEncoder, save_model
from har_ref.model.tokenizer import ClipTokenizer, SiglipTokenizer


def make_tiny_checkpoint(family: str, texts: list[str], out: Path, seed: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if family == "clip":
        tok = train_clip_bpe(texts, out, vocab_size=1000)
        lengths = ClipTokenizer(out, context_length=512)(texts)[1].sum(1)
    else:
        tok = train_sentencepiece(texts, out, vocab_size=400)
        lengths = SiglipTokenizer(out, context_length=512)(texts)[1].sum(1)
    # every prompt fits; SigLIP then pads the rest, as it was trained
    tok["context_length"] = int(lengths.max()) + (0 if family == "clip" else 4)
    torch.manual_seed(seed)
    save_model(DualEncoder(tiny_config(family, tok)), out)
    return out
