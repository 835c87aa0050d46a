"""The training knobs the study's claims need, on the tiny checkpoints: `--loss` on the other family's
towers, `--lock image|text`, `--clamp-logit-scale`, `--resume auto`, and every reader of a run following
its towers and loss (load_model, evaluate, predict, WiSE-FT, export-hf)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import har_ref.train.checkpoint as checkpoint
import har_ref.train.loop as loop
from har_ref import load_model
from har_ref.__main__ import main
from har_ref.demo.synthetic import generate
from har_ref.eval.evaluate import evaluate
from har_ref.eval.predict import run_predict
from har_ref.eval.wise_ft import interpolate
from har_ref.train.config import TrainConfig
from har_ref.train.losses import MAX_LOGIT_SCALE, clip_loss_plain, siglip_loss_plain
from har_ref.train.loop import cached_step, independent_micro_step, train
from har_ref.train.setup import setup
from har_ref.train.state import MicroBatch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate(root, train_per_class=4, test_per_class=2, image_size=32, seed=0)  # 60 images: 7 batches of 8
    return root


def tiny_cfg(model: str, **overrides) -> TrainConfig:
    """2 epochs of 7 micro-batches, 2 per optimizer step, a memory that joins after one enqueue."""
    base = dict(model=model, epochs=2, micro_batch=8, accum_steps=2, xbm_size=32, xbm_warmup_steps=1, lr=1e-3,
                warmup_steps=1, precision="fp32", workers=0, eval_batch=32)
    return TrainConfig(**{**base, **overrides})


def cli_args(weights, data_dir, out, model: str = "clip", *extra) -> list[str]:
    """The command line of tiny_cfg(model)."""
    return ["train", "--model", model, "--weights", str(weights[model]), "--data", str(data_dir), "--out", str(out),
            "--epochs", "2", "--micro-batch", "8", "--accum-steps", "2", "--xbm-size", "32",
            "--xbm-warmup-steps", "1", "--lr", "1e-3", "--warmup-steps", "1", "--precision", "fp32",
            "--workers", "0", "--eval-batch", "32", *extra]


def one_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# ---------------------------------------------------------------- --loss on the other family's towers

PLAIN = {"clip": lambda m, i, t, y: clip_loss_plain(i, t, m.logit_scale, y),
         "siglip": lambda m, i, t, y: siglip_loss_plain(i, t, m.logit_scale, m.logit_bias, y)}


@pytest.mark.parametrize("accum_mode", ["independent", "cached"])
@pytest.mark.parametrize("towers, loss", [("clip", "siglip"), ("siglip", "clip")])
def test_the_other_familys_loss_has_the_plain_losses_gradients(towers, loss, accum_mode, tiny_weights, data_dir,
                                                               tmp_path, measured):
    """One training step (an optimizer step's worth of micro-batches, before the step) gives every parameter
    the gradient of the plain loss function (losses.py) on the same embeddings, in float64."""
    accum_steps = 1 if accum_mode == "independent" else 2
    cfg = tiny_cfg(towers, loss=loss, accum_mode=accum_mode, accum_steps=accum_steps, xbm_size=0)
    run, state = setup(cfg, tiny_weights[towers], data_dir, tmp_path, resume=False, overwrite=False)
    run.model.double()  # the comparison is about the algorithm, not rounding
    batches = []
    for pixels, labels, indices in list(run.loader)[:accum_steps]:
        ids = run.prompts.sample(labels, indices, 0, len(run.dataset))
        batches.append(MicroBatch(pixels.double(), ids, labels, 0, indices))
    if accum_mode == "cached":
        cached_step(run, state, batches)
    else:
        independent_micro_step(run, state, batches[0], last_of_step=True)
    step = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
    run.model.zero_grad(set_to_none=True)
    pixels, ids = torch.cat([b.pixels for b in batches]), torch.cat([b.ids for b in batches])
    image, text = run.model.encode_image(pixels), run.model.encode_text(ids)
    PLAIN[loss](run.model, image, text, torch.cat([b.labels for b in batches])).backward()
    plain = {n: p.grad for n, p in run.model.named_parameters() if p.grad is not None}
    assert step.keys() == plain.keys()
    # per tensor: the largest |step - plain| relative to the tensor's largest plain gradient
    worst = {n: ((step[n] - plain[n]).abs().max() / plain[n].abs().max()).item() for n in plain}
    measured(f"--loss {loss} on {towers} towers, {accum_mode}: max relative |step - plain| gradient "
             f"{max(worst.values()):.1e}")
    assert all(plain[n].abs().max() > 0 for n in plain) and max(worst.values()) < 1e-13, worst  # measured <= 6.5e-15
    if loss == "siglip":  # CLIP towers got a learnable b, started at SigLIP's -10, with a gradient
        assert run.model.logit_bias.requires_grad and step["logit_bias"].abs() > 0
        assert any(p is run.model.logit_bias for g in state.optimizer.param_groups for p in g["params"])
    else:  # SigLIP towers under InfoNCE: b takes no part, has no gradient and no place in the optimizer
        assert not run.model.logit_bias.requires_grad and "logit_bias" not in step
        assert not any(p is run.model.logit_bias for g in state.optimizer.param_groups for p in g["params"])


@pytest.fixture(scope="module")
def crossed_runs(tiny_weights, data_dir, tmp_path_factory):
    """One epoch of each crossing: CLIP towers + sigmoid loss, SigLIP towers + InfoNCE."""
    root = tmp_path_factory.mktemp("crossed")
    for towers, loss in (("clip", "siglip"), ("siglip", "clip")):
        train(tiny_cfg(towers, loss=loss, epochs=1), tiny_weights[towers], data_dir, root / towers)
    return root


@pytest.mark.parametrize("towers, loss, name, rule", [
    ("clip", "siglip", "CLIP towers + sigmoid loss", "sigmoid"),
    ("siglip", "clip", "SigLIP towers + InfoNCE loss", "softmax")])
def test_the_run_records_towers_and_loss_and_its_readers_follow_them(towers, loss, name, rule, crossed_runs,
                                                                    tiny_weights, data_dir, tmp_path):
    out = crossed_runs / towers
    config = json.loads((out / "config.json").read_text())
    train_config = json.loads((out / "train_config.json").read_text())
    assert (config["family"], config["loss"]) == (towers, loss) == (train_config["model"], train_config["loss"])
    model, start = load_model(out), load_model(tiny_weights[towers])
    if loss == "siglip":  # a b the optimizer moved, and the logits include it
        assert start.logit_bias is None and config["logit_bias"] == model.logit_bias.item() != -10.0
    else:  # SigLIP's b untouched, bit for bit
        assert torch.equal(model.logit_bias, start.logit_bias)
    x, y = torch.nn.functional.normalize(torch.randn(2, 2, model.cfg.embed_dim), dim=-1)
    assert torch.equal(model.score(x, y), model.logit_scale.exp() * (x @ y.T) + model.logit_bias)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["model_name"], metrics["family"], metrics["loss"], metrics["probability"]) == (
        name, towers, loss, rule)
    # evaluate on the run directory scores like the run did; predict turns those scores into the loss's probabilities
    again = evaluate(out, data_dir, tmp_path / "eval", shift_split="")
    assert again["macro_f1"] == metrics["macro_f1"] and again["probability"] == rule
    row = (out / "predictions.csv").read_text().splitlines()[1].split(",")
    scores = torch.tensor([float(s) for s in row[3:]], dtype=torch.float64)
    probability = scores.sigmoid() if rule == "sigmoid" else scores.softmax(-1)
    run_predict([str(out)], [row[0]], top_k=3, json_path=str(tmp_path / "p.jsonl"))
    record = json.loads((tmp_path / "p.jsonl").read_text())
    assert (record["model"], record["loss"], record["probability"]) == (name, loss, rule)
    classes = json.loads((out / "classes.json").read_text())
    for top in record["top_k"]:  # predictions.csv keeps 6 significant digits
        assert top["probability"] == pytest.approx(probability[classes.index(top["class"])].item(), rel=1e-4)


def test_wise_ft_keeps_the_runs_b_where_the_zero_shot_checkpoint_has_none(crossed_runs, tiny_weights):
    zero_shot, fine_tuned = load_model(tiny_weights["clip"]), load_model(crossed_runs / "clip")
    for alpha in (0.0, 0.5, 1.0):
        mixed = interpolate(zero_shot, fine_tuned, alpha)
        assert mixed.cfg.loss == "siglip" and torch.equal(mixed.logit_bias, fine_tuned.logit_bias)
    at_zero, start = interpolate(zero_shot, fine_tuned, 0.0).state_dict(), zero_shot.state_dict()
    assert set(at_zero) - set(start) == {"logit_bias"} and all(torch.equal(at_zero[k], v) for k, v in start.items())


def test_export_hf_of_clip_towers_with_b_refuses_unless_told_to_drop_it(crossed_runs, tmp_path, capsys):
    from transformers import CLIPModel

    from weights_conversion.__main__ import main as convert

    src, out = crossed_runs / "clip", tmp_path / "export"
    err = one_error(capsys, convert(["export-hf", "--src", str(src), "--out", str(out)]))
    assert "holds a logit bias b" in err and "--drop-logit-bias" in err and not out.exists()
    assert convert(["export-hf", "--src", str(src), "--out", str(out), "--drop-logit-bias"]) == 0
    assert "is not exported (--drop-logit-bias)" in capsys.readouterr().out
    ours = load_model(src)
    theirs = CLIPModel.from_pretrained(out).eval()
    size = ours.cfg.vision.image_size
    pixels, ids = torch.randn(2, 3, size, size), torch.tensor([[0, 5, 9, ours.cfg.text.eos_token_id]] * 3)
    with torch.no_grad():  # the same logits less b: the same predictions and softmax
        torch.testing.assert_close(theirs(input_ids=ids, pixel_values=pixels).logits_per_image,
                                   ours(pixels, ids) - ours.logit_bias, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- --lock

def crash_after_first_checkpoint(monkeypatch):
    save = checkpoint.save

    def save_then_crash(*args):
        save(*args)
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    return save


@pytest.mark.parametrize("accum_mode", ["independent", "cached"])
@pytest.mark.parametrize("lock", ["image", "text"])
def test_a_locked_tower_is_bit_identical_after_training_and_resume(lock, accum_mode, tiny_weights, data_dir,
                                                                   tmp_path, monkeypatch):
    """A run with --lock, stopped after its first checkpoint and resumed: the locked tower's weights are the
    checkpoint's, bit for bit, the other tower trained, and no optimizer state was ever kept for the lock."""
    cfg = tiny_cfg("clip", lock=lock, accum_mode=accum_mode, checkpoint_every=3)
    tower = "vision." if lock == "image" else "text."
    run, state = setup(cfg, tiny_weights["clip"], data_dir, tmp_path / "probe", resume=False, overwrite=False)
    locked = [p for n, p in run.model.named_parameters() if n.startswith(tower)]
    optimized = [p for g in state.optimizer.param_groups for p in g["params"]]
    assert locked and not any(p.requires_grad for p in locked) and not any(p is q for p in locked for q in optimized)
    loop.train_epoch(run, state)
    assert not (run.model.vision if lock == "image" else run.model.text).training  # kept in eval mode
    assert not any(p in state.optimizer.state for p in locked) and state.optimizer.state
    out = tmp_path / "run"
    save = crash_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tiny_weights["clip"], data_dir, out)
    monkeypatch.setattr(checkpoint, "save", save)
    train(cfg, tiny_weights["clip"], data_dir, out, resume=True)
    start, trained = load_file(str(tiny_weights["clip"] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(trained[k], v) for k, v in start.items() if k.startswith(tower))
    other = "text." if lock == "image" else "vision."
    assert not all(torch.equal(trained[k], v) for k, v in start.items() if k.startswith(other))
    saved = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)["optimizer"]
    n_trained = sum(1 for n, _ in load_model(tiny_weights["clip"]).named_parameters() if not n.startswith(tower))
    assert sum(len(g["params"]) for g in saved["param_groups"]) == len(saved["state"]) == n_trained


# ---------------------------------------------------------------- --clamp-logit-scale

def test_clamp_none_lets_clips_temperature_past_ln_100(tiny_weights, data_dir, tmp_path, measured):
    """From a pretrained t = 4.765 (exp t ~ 117, as tests/test_train.py starts it): upstream's clamp cuts it
    to ln 100 at the first step, none leaves it above."""
    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights["clip"], weights)
    tensors = load_file(str(weights / "model.safetensors"))
    save_file({**tensors, "logit_scale": torch.tensor(4.765)}, str(weights / "model.safetensors"))
    for clamp in ("upstream", "none"):
        train(tiny_cfg("clip", epochs=1, clamp_logit_scale=clamp), weights, data_dir, tmp_path / clamp)
    t = {clamp: json.loads((tmp_path / clamp / "log.jsonl").read_text())["logit_scale"] for clamp in ("upstream", "none")}
    measured(f"--clamp-logit-scale: t after one epoch from 4.765, upstream {t['upstream']:.4f}, none {t['none']:.4f}")
    assert t["upstream"] <= MAX_LOGIT_SCALE < t["none"]
    assert t["none"] == pytest.approx(4.765, abs=0.005)  # 4 steps of lr 1e-3 from 4.765: measured 4.7626


# ---------------------------------------------------------------- --resume auto

def file_bytes(directory) -> dict:
    return {p.relative_to(directory): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_resume_auto_starts_resumes_restarts_and_leaves_a_finished_run(tiny_weights, data_dir, tmp_path,
                                                                       monkeypatch, capsys):
    cfg, weights = tiny_cfg("clip", loss="siglip", checkpoint_every=3), tiny_weights["clip"]
    reference = tmp_path / "reference"
    train(cfg, weights, data_dir, reference, resume="auto")  # absent: a fresh start
    assert "resumed from" not in capsys.readouterr().out

    killed = tmp_path / "killed"  # stopped right after its first checkpoint (micro-batch 3)
    save = crash_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, weights, data_dir, killed, resume="auto")
    monkeypatch.setattr(checkpoint, "save", save)
    train(cfg, weights, data_dir, killed, resume="auto")
    assert "resumed from" in capsys.readouterr().out

    early = tmp_path / "early"  # stopped before any checkpoint: its first files only
    train_epoch = loop.train_epoch
    monkeypatch.setattr(loop, "train_epoch", lambda run, state: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, weights, data_dir, early, resume="auto")
    monkeypatch.setattr(loop, "train_epoch", train_epoch)
    assert (early / "train_config.json").is_file() and not (early / "checkpoint").exists()
    train(cfg, weights, data_dir, early, resume="auto")
    assert "no checkpoint yet: starting it again" in capsys.readouterr().out

    for out in (killed, early):  # the same bytes as the uninterrupted run
        for name in ("model.safetensors", "log.jsonl", "predictions.csv", "predictions_shift.csv"):
            loss_lines = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
            if name == "log.jsonl":
                assert loss_lines == [json.loads(line)["loss"] for line in
                                      (reference / name).read_text().splitlines()]
            else:
                assert (out / name).read_bytes() == (reference / name).read_bytes(), (out, name)

    before = file_bytes(reference)
    metrics = train(cfg, weights, data_dir, reference, resume="auto")
    assert "finished" in capsys.readouterr().out and file_bytes(reference) == before
    assert metrics["macro_f1"] == json.loads((reference / "metrics.json").read_text())["macro_f1"]


def test_resume_auto_refuses_a_run_of_other_options_in_one_sentence(tiny_weights, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli_args(tiny_weights, data_dir, out, "clip", "--epochs", "1", "--resume", "auto")) == 0
    capsys.readouterr()
    before = file_bytes(out)
    err = one_error(capsys, main(cli_args(tiny_weights, data_dir, out, "clip", "--epochs", "1", "--lr", "5e-4",
                                          "--workers", "1", "--resume", "auto")))
    assert "--lr 0.001 there, 0.0005 now" in err and "another --out" in err  # --workers may differ
    err = one_error(capsys, main(cli_args(tiny_weights, data_dir, out, "clip", "--epochs", "1", "--loss", "siglip",
                                          "--lock", "image", "--resume", "auto")))
    assert "--loss 'clip' there, 'siglip' now" in err  # the first option that differs
    assert file_bytes(out) == before
    err = one_error(capsys, main(cli_args(tiny_weights, data_dir, tiny_weights["clip"], "clip", "--resume", "auto")))
    assert "is the --weights directory" in err
    err = one_error(capsys, main(cli_args(tiny_weights, data_dir, out, "clip", "--resume", "sometimes")))
    assert "--resume takes no value or auto" in err
    for flag, value in (("--loss", "softmax"), ("--lock", "both"), ("--clamp-logit-scale", "100")):
        err = one_error(capsys, main(cli_args(tiny_weights, data_dir, tmp_path / "new", "clip", flag, value)))
        assert err.startswith(f"error: {flag} must be")
