"""Faults a long run must survive: SIGKILL at any moment, Ctrl-C, non-finite losses.

Kills are real: each run is a `python -m har_ref train` process (through tests/fault_runner.py,
which can make the process SIGKILL or SIGINT itself at a chosen point: after micro-batch N, in
the middle of writing a checkpoint, or between the checkpoint's two renames), or a process killed
from outside after a random delay. A killed run is resumed with --resume until it completes; its
final model.safetensors must equal, byte for byte, that of a run that was never interrupted, and
so must its metrics and log losses. Every process runs with one thread, so the float arithmetic of
the two runs is the same and any difference would come from the state that resume restores.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from har_ref.train.checkpoint import find_checkpoint
from har_ref.demo.synthetic import generate
import har_ref.train.loop as loop
from har_ref.train.loop import train
from har_ref.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
RUNNER = Path(__file__).with_name("fault_runner.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate(root, train_per_class=4, test_per_class=2, image_size=32, seed=0)  # 60 images: 7 batches of 8
    return root


@pytest.fixture(scope="module")
def weights(tiny_weights):
    return tiny_weights


def flags(model: str, weights, data_dir, out: Path, **extra) -> list[str]:
    """2 epochs of 7 micro-batches, 2 per optimizer step (a step spans the epoch boundary), XBM,
    augmentation (random crops drawn per item), a checkpoint every 3 micro-batches (mid-epoch)."""
    base = {"--epochs": 2, "--micro-batch": 8, "--accum-steps": 2, "--xbm-size": 32, "--xbm-warmup-steps": 1,
            "--lr": 1e-3, "--warmup-steps": 1, "--precision": "fp32", "--workers": 0, "--eval-batch": 32,
            "--checkpoint-every": 3, **extra}
    args = ["train", "--model", model, "--weights", str(weights[model]), "--data", str(data_dir), "--out", str(out),
            "--augment"]
    for key, value in base.items():
        args += [key, str(value)]
    return args


def run(args: list[str], fault: dict | None = None, expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(RUNNER), json.dumps(fault or {}), *args], capture_output=True,
                          text=True, env=ENV)
    assert done.returncode == expect, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done


def outcome(out: Path) -> tuple[bytes, dict, list]:
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    return (out / "model.safetensors").read_bytes(), {k: metrics[k] for k in ("accuracy", "macro_f1", "ece")}, losses


@pytest.fixture(scope="module")
def reference(weights, data_dir, tmp_path_factory):
    """Uninterrupted runs, one per accumulation mode."""
    root = tmp_path_factory.mktemp("reference")
    run(flags("clip", weights, data_dir, root / "independent"))
    run(flags("siglip", weights, data_dir, root / "cached", **CACHED))
    return {mode: outcome(root / mode) for mode in ("independent", "cached")}


SIGKILL = -signal.SIGKILL
CACHED = {"--accum-mode": "cached", "--accum-steps": 3, "--checkpoint-every": 2}


def test_sigkill_mid_epoch_during_a_write_and_between_renames_resumes_bit_identically(
        reference, weights, data_dir, tmp_path):
    """Checkpoints after micro-batches 3, 6, 7 (epoch end), 9, 12, 14; 7 per epoch, 2 per step."""
    out = tmp_path / "run"
    args = flags("clip", weights, data_dir, out)
    run(args, {"kill_after_micro": 5}, expect=SIGKILL)  # last checkpoint: micro-batch 3, half a step
    resumed = run(args + ["--resume"], {"kill_between_renames_at_micro": 9}, expect=SIGKILL)
    assert "at epoch 1, micro-batch 3" in resumed.stdout
    assert (out / "checkpoint.old").is_dir() and not (out / "checkpoint").exists()  # the swap was cut
    resumed = run(args + ["--resume"], {"kill_in_save_at_micro": 12}, expect=SIGKILL)
    assert "checkpoint.old at epoch 2, micro-batch 0" in resumed.stdout  # the epoch-end checkpoint survived
    assert (out / "checkpoint.tmp" / "trainer_state.pt").read_bytes().endswith(b"half a checkpoint")
    resumed = run(args + ["--resume"])
    assert "checkpoint at epoch 2, micro-batch 2" in resumed.stdout  # micro-batch 9: the torn 12 was ignored
    assert outcome(out) == reference["independent"]


def test_sigkill_in_cached_mode_rereads_the_pending_micro_batches(reference, weights, data_dir, tmp_path):
    """GradCache, 3 micro-batches per step, checkpoints every 2: the checkpoints of micro-batches 4
    and 8 hold 1 and 2 micro-batches of an unfinished step (8's spans the epoch boundary). The
    second kill cuts short the removal of the previous checkpoint, which the next save finishes."""
    out = tmp_path / "run"
    args = flags("siglip", weights, data_dir, out, **CACHED)
    run(args, {"kill_after_micro": 5}, expect=SIGKILL)
    resumed = run(args + ["--resume"], {"kill_in_cleanup_at_micro": 8}, expect=SIGKILL)
    assert "at epoch 1, micro-batch 4" in resumed.stdout
    assert (out / "checkpoint").is_dir() and (out / "checkpoint.old").is_dir()
    resumed = run(args + ["--resume"])
    assert "at epoch 2, micro-batch 1" in resumed.stdout
    assert outcome(out) == reference["cached"]


def torchrun(args: list[str], fault: dict | None = None, killed: bool = False) -> subprocess.CompletedProcess:
    """2 ranks (gloo, CPU) of the fault runner; every rank injects the fault."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(RUNNER), json.dumps(fault or {}), *args], capture_output=True, text=True,
                          env=ENV)
    assert (done.returncode != 0) == killed, done.stderr[-3000:]
    return done


def test_two_rank_cached_run_killed_and_resumed_equals_an_uninterrupted_one(weights, data_dir, tmp_path):
    """torchrun, 2 ranks x 7 micro-batches of 4 per epoch, 3 per step, one contrastive problem per
    step over both ranks: the checkpoints of micro-batches 4 and 8 hold every rank's own pending
    micro-batches (8's span the epoch boundary), and each rank re-reads its own."""
    args = lambda out: flags("siglip", weights, data_dir, out, **{**CACHED, "--micro-batch": 4})  # noqa: E731
    torchrun(args(tmp_path / "reference"))
    out = tmp_path / "run"
    torchrun(args(out), {"kill_after_micro": 5}, killed=True)
    resumed = torchrun(args(out) + ["--resume"], {"kill_after_micro": 9}, killed=True)
    assert "at epoch 1, micro-batch 4" in resumed.stdout
    resumed = torchrun(args(out) + ["--resume"])
    assert "at epoch 2, micro-batch 1" in resumed.stdout
    assert outcome(out) == outcome(tmp_path / "reference")


def test_two_rank_independent_run_killed_mid_step_resumes_to_the_same_weights(weights, data_dir, tmp_path, measured):
    """torchrun, 2 ranks, independent accumulation of 2 micro-batches, killed after micro-batch 5 whose
    last checkpoint (micro-batch 3) holds half a step: each rank's partial gradients differ, and the
    checkpoint keeps their sum (what the step's all-reduce uses). Equal up to summation order."""
    from har_ref.model.dual_encoder import read_safetensors

    args = lambda out: flags("clip", weights, data_dir, out, **{"--micro-batch": 4})  # noqa: E731
    torchrun(args(tmp_path / "reference"))
    out = tmp_path / "run"
    torchrun(args(out), {"kill_after_micro": 5}, killed=True)
    resumed = torchrun(args(out) + ["--resume"])
    assert "at epoch 1, micro-batch 3" in resumed.stdout
    expected, got = read_safetensors(tmp_path / "reference" / "model.safetensors"), read_safetensors(out / "model.safetensors")
    worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
    measured(f"[ddp] independent resume: max |uninterrupted - resumed| over all weights: {worst:.2e}")
    assert worst < 2e-6  # measured 2.8e-7


def checkpoint_micro_step(out: Path) -> int | None:
    """The micro-step of OUT's current checkpoint, None if there is none (or it was being swapped)."""
    try:
        return torch.load(find_checkpoint(out) / "trainer_state.pt", weights_only=True)["micro_step"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return None


def resumed_at(stdout: str) -> int | None:
    """The micro-step a run says it resumed from (7 micro-batches per epoch); None if it did not resume."""
    found = re.search(r"resumed from \S+ at epoch (\d+), micro-batch (\d+)", stdout)
    return None if found is None else (int(found[1]) - 1) * 7 + int(found[2])


def test_sigkill_at_random_moments_with_a_worker(reference, weights, data_dir, tmp_path):
    """Killed from outside three times, each time after the process wrote a checkpoint of its own: the first
    right after it (mid-epoch), the others after a random delay (in a step, a write, evaluation, or after the
    end). Every restart is a --resume from the checkpoint the last process left; with a data worker where the
    reference had none: augmentation depends on the item only."""
    out = tmp_path / "run"
    args = flags("clip", weights, data_dir, out, **{"--workers": 1, "--checkpoint-every": 1})
    rng = random.Random(0)
    env = {**ENV, "PYTHONUNBUFFERED": "1"}  # the "resumed from" line reaches the file before the kill
    first_kill_at = None
    for attempt in range(3):
        before = checkpoint_micro_step(out)
        log = tmp_path / f"attempt{attempt}.txt"
        with open(log, "w") as stdout:
            process = subprocess.Popen([sys.executable, "-m", "har_ref", *args, *(["--resume"] if attempt else [])],
                                       env=env, stdout=stdout, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 300
            while checkpoint_micro_step(out) in (None, before) and process.poll() is None:
                assert time.monotonic() < deadline, "no checkpoint after 300 s"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.5) if attempt else 0.0)
            process.kill()
            process.wait()
        assert checkpoint_micro_step(out) is not None
        if attempt == 0:
            first_kill_at = checkpoint_micro_step(out)
            assert process.returncode == SIGKILL and not (out / "metrics.json").exists()  # killed mid-run
        else:  # a restart from --weights would end with the same bytes: only this line tells them apart
            assert resumed_at(log.read_text()) == before
    assert 1 <= first_kill_at < 14  # 2 epochs of 7 micro-batches
    before = checkpoint_micro_step(out)
    final = run(args + ["--resume"])
    assert resumed_at(final.stdout) == before
    assert outcome(out) == reference["independent"]


def test_ctrl_c_writes_a_checkpoint_and_exits_130(reference, weights, data_dir, tmp_path):
    out = tmp_path / "run"
    args = flags("clip", weights, data_dir, out, **{"--checkpoint-every": 0, "--checkpoint-minutes": 0})
    done = run(args, {"sigint_at_micro": 4}, expect=130)
    assert "SIGINT: stopping after this batch" in done.stderr
    assert "continue with the same command and --resume" in done.stderr
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"], state["micro_step"]) == (0, 4, 4)  # the only checkpoint
    run(args + ["--resume"])
    assert outcome(out) == reference["independent"]


# ---------------------------------------------------------------- non-finite losses (in process)

def tiny_cfg(model: str, **overrides) -> TrainConfig:
    base = dict(model=model, epochs=2, micro_batch=8, accum_steps=2, xbm_size=32, xbm_warmup_steps=1, lr=1e-3,
                warmup_steps=1, precision="fp32", workers=0, eval_batch=32)
    return TrainConfig(**{**base, **overrides})


def poison_losses(monkeypatch, micro_steps, factor=float("nan")):
    """Make the training loss return loss * factor at the given micro-steps (1-based)."""
    original = loop.contrastive_loss

    def loss(run, state, image, text, labels):
        value = original(run, state, image, text, labels)
        return value * factor if state.micro_step in micro_steps else value
    monkeypatch.setattr(loop, "contrastive_loss", loss)


def watch_steps(monkeypatch) -> dict:
    """Record the run, its state and the weights after every optimizer step (keyed by micro-step)."""
    seen = {"weights_after": {}}
    original_step = loop.optimizer_step

    def optimizer_step(run, state):
        original_step(run, state)
        seen.update(run=run, state=state)
        seen["weights_after"][state.micro_step] = torch.cat([p.detach().flatten() for p in run.model.parameters()])
    monkeypatch.setattr(loop, "optimizer_step", optimizer_step)
    return seen


def all_finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.state_dict().values())


def test_an_isolated_nan_loss_skips_its_step_and_is_counted(weights, data_dir, tmp_path, monkeypatch):
    poison_losses(monkeypatch, {3})
    seen = watch_steps(monkeypatch)
    weights_after = seen["weights_after"]  # micro-step -> all weights after the optimizer step that ended there
    metrics = train(tiny_cfg("clip"), weights["clip"], data_dir, tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [(r["nonfinite_losses"], r["skipped_steps"]) for r in log] == [(1, 1), (0, 0)]
    assert torch.equal(weights_after[4], weights_after[2])  # the step of micro-batches 3-4 changed nothing
    assert not torch.equal(weights_after[6], weights_after[4])  # and training went on
    assert all(r["loss"] == r["loss"] for r in log)  # the epoch's mean leaves the NaN out
    assert all_finite(seen["run"].model) and 0 <= metrics["accuracy"] <= 1
    assert torch.isfinite(seen["state"].xbm.get()[0]).all()


def test_consecutive_nan_losses_stop_the_run_and_keep_the_last_good_checkpoint(weights, data_dir, tmp_path,
                                                                                monkeypatch, capsys):
    from har_ref.__main__ import main

    poison_losses(monkeypatch, set(range(5, 100)))
    out = tmp_path / "run"
    code = main(flags("clip", weights, data_dir, out, **{"--max-nonfinite": 3, "--checkpoint-every": 1}))
    err = capsys.readouterr().err
    assert code == 1 and "training diverged: 3 consecutive non-finite losses" in err
    assert "epoch 1, micro-batch 7" in err.splitlines()[-1]
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["micro_step"] == 6 and state["step"] == 3  # written after micro-batch 6, not after the 7th
    from har_ref.model.dual_encoder import load_model
    good = load_model(out / "checkpoint")
    assert all_finite(good)


def test_fp16_overflow_is_skipped_by_the_grad_scaler_and_counted(weights, data_dir, tmp_path, monkeypatch):
    """A finite loss whose scaled gradients overflow: the GradScaler skips the step and halves its scale."""
    import har_ref.train.setup as setup_module

    monkeypatch.setattr(setup_module, "grad_scaler", lambda precision, device: torch.amp.GradScaler("cpu"))
    poison_losses(monkeypatch, {1}, factor=1e36)  # loss ~1e36 is finite; x 65536 (the scale) is not
    seen = watch_steps(monkeypatch)
    train(tiny_cfg("clip", epochs=1), weights["clip"], data_dir, tmp_path / "run")
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text())
    assert log["nonfinite_losses"] == 0 and log["skipped_steps"] == 1
    assert seen["state"].scaler.get_scale() == 2.0 ** 15  # one backoff from 2 ** 16
    assert all_finite(seen["run"].model)