"""The training loop on tiny converted upstream checkpoints and synthetic data.

Upstream (transformers) models and tokenizers are built at tiny sizes, saved with
save_pretrained, converted with weights_conversion, then trained with `python -m har_ref train`'s
code path. The GradCache test checks the `cached` accumulation mode against one big batch.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, SiglipConfig, SiglipModel, SiglipTokenizer

from har_ref.data.prompts import PromptBank
from har_ref.demo.synthetic import CLASS_NAMES, generate
from har_ref.demo.tokenizer_training import train_clip_bpe, train_sentencepiece
from har_ref.train.loop import cached_step, contrastive_loss, train
from har_ref.train.setup import setup
from har_ref.train.state import MicroBatch
from har_ref.train.config import TrainConfig
from weights_conversion.hf import convert_hf


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate(root, train_per_class=4, test_per_class=2, image_size=32, seed=0)
    return root


def prompt_texts():
    return PromptBank.from_file(None, list(CLASS_NAMES)).all_prompts()[0]


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    """A tiny CLIPModel + CLIPTokenizer saved by transformers, converted to har_ref."""
    root = tmp_path_factory.mktemp("clip")
    tok = train_clip_bpe(prompt_texts(), root / "vocab", vocab_size=700)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=tok["vocab_size"], max_position_embeddings=32, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(cfg).save_pretrained(root / "hf")
    CLIPTokenizer.from_pretrained(root / "vocab").save_pretrained(root / "hf")
    return convert_hf(root / "hf", root / "converted")


@pytest.fixture(scope="module")
def siglip_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("siglip")
    tok = train_sentencepiece(prompt_texts(), root / "vocab", vocab_size=200)
    torch.manual_seed(0)
    cfg = SiglipConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=tok["vocab_size"], max_position_embeddings=24),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8))
    SiglipModel(cfg).save_pretrained(root / "hf")
    SiglipTokenizer(vocab_file=str(root / "vocab" / "spiece.model")).save_pretrained(root / "hf")
    return convert_hf(root / "hf", root / "converted")


def tiny_cfg(model: str, **overrides) -> TrainConfig:
    base = dict(model=model, epochs=2, micro_batch=8, accum_steps=2, xbm_size=32, xbm_warmup_steps=1, lr=1e-3,
                warmup_steps=1, precision="fp32", workers=0, eval_batch=16)
    return TrainConfig(**{**base, **overrides})


def with_temperature(weights, t: float, out):
    """A copy of the checkpoint WEIGHTS whose t is a pretrained model's (a weight, as upstream stores it)."""
    shutil.copytree(weights, out)
    tensors = load_file(str(out / "model.safetensors"))
    tensors["logit_scale"] = torch.tensor(t)
    save_file(tensors, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("model", ["clip", "siglip"])
def test_train_writes_a_complete_run(model, clip_weights, siglip_weights, data_dir, tmp_path):
    """Every file of the run; CLIP's t, started at a pretrained 4.765 (exp t ~ 117), clamped to ln 100."""
    weights = clip_weights if model == "clip" else siglip_weights
    if model == "clip":
        weights = with_temperature(weights, 4.765, tmp_path / "weights")
    out = tmp_path / "run"
    metrics = train(tiny_cfg(model), weights, data_dir, out)
    for name in ("config.json", "model.safetensors", "train_config.json", "log.jsonl", "metrics.json",
                 "predictions.csv", "confusion.png", "checkpoint/model.safetensors", "checkpoint/trainer_state.pt"):
        assert (out / name).is_file(), name
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    # 60 images, drop_last with 8 per micro-batch -> 7 micro-batches per epoch, 2 per step -> 7 steps (+1 partial)
    assert log[-1]["step"] == 7 and all(r["images_per_s"] > 0 for r in log)
    assert all((r["logit_bias"] is None) == (model == "clip") for r in log)
    assert metrics["num_samples"] == 30 and json.loads((out / "metrics.json").read_text())["family"] == model
    with open(out / "predictions.csv", encoding="utf-8") as f:  # the metrics are those of the predictions
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 and metrics["accuracy"] == sum(r["true"] == r["pred"] for r in rows) / 30
    if model == "clip":  # unclamped, 7 steps of lr 1e-3 would leave t within 0.01 of 4.765
        assert all(math.log(100) - 0.01 <= r["logit_scale"] <= math.log(100) for r in log)  # measured ln 100 - 0.002
    # the run directory is itself a checkpoint: evaluate can load it (tokenizer files copied), trained weights
    from har_ref import load_model, load_tokenizer
    trained, start = load_model(out).state_dict(), load_model(weights).state_dict()
    assert trained.keys() == start.keys() and not torch.equal(trained["text.proj.weight"], start["text.proj.weight"])
    ids, _ = load_tokenizer(out)(["a photo of a person running."])
    assert torch.equal(ids, load_tokenizer(weights)(["a photo of a person running."])[0])


def test_resume_continues_where_it_stopped(clip_weights, data_dir, tmp_path, monkeypatch):
    """A run killed right after its first checkpoint, resumed, logs what an uninterrupted run logs
    (7 micro-batches per epoch and 2 per step: the checkpoint holds half a step's gradients)."""
    import har_ref.train.checkpoint as checkpoint

    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny_cfg("clip"), clip_weights, data_dir, full)
    save = checkpoint.save

    def save_then_crash(*args):
        save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg("clip"), clip_weights, data_dir, part)
    monkeypatch.setattr(checkpoint, "save", save)
    train(tiny_cfg("clip"), clip_weights, data_dir, part, resume=True)
    log_full = [json.loads(x) for x in (full / "log.jsonl").read_text().splitlines()]
    log_part = [json.loads(x) for x in (part / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_part] == [r["step"] for r in log_full] == [3, 7]
    # same data order, prompts, memory, optimizer state and pending gradients -> the same losses and weights,
    # bit for bit (one process, one thread)
    assert [r["loss"] for r in log_part] == [r["loss"] for r in log_full]
    assert (part / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()


@pytest.mark.parametrize("model", ["clip", "siglip"])
def test_cached_accumulation_equals_one_big_batch(model, clip_weights, siglip_weights, data_dir, tmp_path):
    """GradCache: 3 micro-batches of 8 give the gradients of one contrastive batch of 24."""
    weights = clip_weights if model == "clip" else siglip_weights
    run, state = setup(tiny_cfg(model, accum_mode="cached", accum_steps=3, xbm_size=0), weights, data_dir, tmp_path,
                       resume=False, overwrite=False)
    run.model.double()  # float64 so the comparison is about the algorithm, not rounding
    batches = []
    for pixels, labels, indices in list(run.loader)[:3]:
        ids = run.prompts.sample(labels, indices, 0, len(run.dataset))
        batches.append(MicroBatch(pixels.double(), ids, labels, 0, indices))
    cached_step(run, state, batches)
    cached = {n: p.grad.clone() for n, p in run.model.named_parameters()}
    run.model.zero_grad()
    image, text = run.embed(torch.cat([b.pixels for b in batches]), torch.cat([b.ids for b in batches]))
    contrastive_loss(run, state, image, text, torch.cat([b.labels for b in batches])).backward()
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(cached[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert cached["logit_scale"].abs() > 0


def test_siglip_keeps_a_pretrained_temperature(siglip_weights, data_dir, tmp_path):
    """A SigLIP checkpoint with a pretrained t = 4.765 (exp t ~ 117) keeps it through fine-tuning:
    only CLIP's temperature is clamped to ln 100 (docs/losses.md)."""
    weights = with_temperature(siglip_weights, 4.765, tmp_path / "weights")
    train(tiny_cfg("siglip", epochs=1, lr=1e-4), weights, data_dir, tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert abs(log[-1]["logit_scale"] - 4.765) < 0.01  # a few steps of lr 1e-4, not a cut to 4.605


def test_cli_missing_weights_is_one_clear_line(data_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "har_ref", "train", "--model", "siglip", "--weights",
                           str(tmp_path / "nope"), "--data", str(data_dir), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "weights_conversion" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_cli_model_weights_mismatch(clip_weights, data_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "har_ref", "train", "--model", "siglip", "--weights",
                           str(clip_weights), "--data", str(data_dir), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "is a clip checkpoint" in done.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("model", ["clip", "siglip"])
def test_torchrun_two_ranks_equals_one_process(model, clip_weights, siglip_weights, data_dir, tmp_path, measured):
    """`torchrun --nproc_per_node 2 -m har_ref train` (gloo, CPU): 2 ranks x 4 images per step train
    the same weights as 1 process x 8 images, XBM included; only rank 0 writes the run."""
    import os

    from safetensors.torch import load_file

    weights = clip_weights if model == "clip" else siglip_weights
    common = ["--model", model, "--weights", str(weights), "--data", str(data_dir), "--epochs", "1",
              "--accum-steps", "1", "--xbm-size", "16", "--xbm-warmup-steps", "1", "--lr", "1e-3",
              "--warmup-steps", "1", "--precision", "fp32", "--workers", "0", "--no-augment"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    single = subprocess.run([sys.executable, "-m", "har_ref", "train", *common, "--micro-batch", "8",
                             "--out", str(tmp_path / "single")], capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(free_port()), "-m", "har_ref", "train", *common,
                          "--micro-batch", "4", "--out", str(tmp_path / "ddp")],
                         capture_output=True, text=True, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("[train] test accuracy") == 1  # evaluation and logs on rank 0 only
    assert len((tmp_path / "ddp" / "log.jsonl").read_text().splitlines()) == 1
    a, b = load_file(str(tmp_path / "single" / "model.safetensors")), load_file(str(tmp_path / "ddp" / "model.safetensors"))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    measured(f"[ddp] {model}: max |single - 2 ranks| over all weights after 7 steps: {worst:.2e}")
    assert worst < 1e-5


def test_cached_images_train_like_decoded_images(clip_weights, data_dir, tmp_path):
    """--cache-dir reads the same pixels as decoding every epoch: identical training logs."""
    decoded = train(tiny_cfg("clip", epochs=1), clip_weights, data_dir, tmp_path / "decoded")
    cached = train(tiny_cfg("clip", epochs=1, cache_dir=str(tmp_path / "cache")), clip_weights, data_dir,
                   tmp_path / "cached")
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").iterdir())
    log = [json.loads((tmp_path / run / "log.jsonl").read_text()) for run in ("decoded", "cached")]
    assert log[0]["loss"] == log[1]["loss"] and decoded == cached  # the same pixels: bit for bit
    assert (tmp_path / "decoded" / "model.safetensors").read_bytes() == (tmp_path / "cached" / "model.safetensors").read_bytes()


def test_auto_logit_bias_is_the_logit_of_the_counted_positive_share(siglip_weights, data_dir, tmp_path):
    """--logit-bias-init auto: b = log(p / (1 - p)), p the share of same-class pairs among the
    anchor-candidate pairs of epoch 0's micro-batches, counted here pair by pair."""
    import math

    run, _ = setup(tiny_cfg("siglip", logit_bias_init="auto"), siglip_weights, data_dir, tmp_path,
                   resume=False, overwrite=False)
    run.loader.sampler.set_epoch(0)
    labels = [run.dataset.items[i][1] for _, i in run.loader.sampler]
    batches = [labels[s:s + 8] for s in range(0, len(labels) - 7, 8)]
    positive = sum(a == b for batch in batches for a in batch for b in batch)
    share = positive / sum(len(batch) ** 2 for batch in batches)
    assert run.model.logit_bias.item() == pytest.approx(math.log(share / (1 - share)), abs=1e-6)
    run, _ = setup(tiny_cfg("siglip", logit_bias_init="-3.5"), siglip_weights, data_dir, tmp_path / "b",
                   resume=False, overwrite=False)
    assert run.model.logit_bias.item() == -3.5
    run, _ = setup(tiny_cfg("siglip"), siglip_weights, data_dir, tmp_path / "c", resume=False, overwrite=False)
    from har_ref.model.dual_encoder import load_model
    assert run.model.logit_bias.item() == load_model(siglip_weights).logit_bias.item()  # "checkpoint": kept
