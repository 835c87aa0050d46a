"""`python -m har_ref study`: plan checks, the commands it runs or prints, a study killed and run again, the
report and study.json, and the shipped plan of the study's claims.

A tiny world (15 classes, 4 training and 2 test images each, a shifted split) and the demo's shipped
pretrained tiny checkpoints, converted as a user converts theirs.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from har_ref.__main__ import build_parser, main
from har_ref.demo.synthetic import generate
from har_ref.demo.tiny import CHECKPOINTS
from har_ref.study.plan import PlanError, load_plan
from har_ref.study import report
from har_ref.study.report import grid_cells, schedule, towers_x_loss
from weights_conversion.hf import convert_hf

ROOT = Path(__file__).resolve().parents[1]
CLAIMS = ROOT / "har_ref" / "study" / "claims.toml"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate(root / "data", train_per_class=4, test_per_class=2, shift_per_class=2, image_size=32, seed=1)
    weights = {family: convert_hf(CHECKPOINTS / family, root / "weights" / family) for family in ("clip", "siglip")}
    return root / "data", weights


def write_plan(path: Path, world, cells: str, base: str = "", top: str = 'seeds = [0]\nbaseline = "a"') -> Path:
    data, weights = world
    path.write_text(f'{top}\n[base]\nweights = "{weights["clip"]}"\ndata = "{data}"\nepochs = 1\nmicro-batch = 20\n'
                    f'accum_steps = 2\nxbm_size = 40\nxbm_warmup_steps = 1\nprecision = "fp32"\nworkers = 0\n'
                    f'{base}\n{cells}')
    return path


def study(*args, ok: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "har_ref", "study", *map(str, args)], capture_output=True, text=True,
                          env=ONE_THREAD, cwd=ROOT, **kwargs)
    assert (done.returncode == 0) == ok, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done


# ---------------------------------------------------------------- plan checks

CELL_A = '[[cells]]\nname = "a"\n'
BAD_PLANS = {  # case: (extra [base] lines, cells, top-level lines, what the one sentence must name)
    "unknown option": ("", CELL_A + "epoch = 2\n", None, ["cell 'a'", "key 'epoch'", "did you mean 'epochs'"]),
    "unknown baseline": ("", CELL_A, 'seeds = [0]\nbaseline = "b"', ["key 'baseline'", "'b'", "a"]),
    "duplicate name": ("", CELL_A + CELL_A, None, ["cell 'a'", "key 'name'", "two cells"]),
    "value the parser refuses": ("", CELL_A + 'epochs = "two"\n', None,
                                 ["cell 'a'", "key 'epochs'", "invalid int value: 'two'"]),
    "value TrainConfig refuses": ("", CELL_A + 'accum_mode = "sideways"\n', None,
                                  ["cell 'a'", "key 'accum_mode'", "--accum-mode must be independent or cached"]),
    "value from [base] refused": ("lr = -1\n", CELL_A, None, ["cell 'a'", "key 'lr' (from [base])", "--lr"]),
    "switch given a word": ("", CELL_A + 'augment = "yes"\n', None, ["cell 'a'", "key 'augment'", "true or false"]),
    "option the study sets": ("", CELL_A + 'out = "elsewhere"\n', None, ["cell 'a'", "key 'out'"]),
    "unknown option in [base]": ("epohcs = 2\n", CELL_A, None, ["[base]", "key 'epohcs'", "did you mean 'epochs'"]),
    "train option on a zero-shot cell": ("", CELL_A + '[[cells]]\nname = "z"\nkind = "zero-shot"\nepochs = 1\n', None,
                                         ["cell 'z'", "key 'epochs'", "python -m har_ref evaluate"]),
    "unknown kind": ("", CELL_A + 'kind = "fine-tune"\n', None, ["cell 'a'", "key 'kind'", "zero-shot"]),
    "unknown reference": ("", CELL_A + 'reference = "nope"\n', None, ["cell 'a'", "key 'reference'", "'nope'"]),
    "seeds not a list": ("", CELL_A + "seeds = 3\n", None, ["cell 'a'", "key 'seeds'"]),
}


@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_a_bad_plan_is_one_sentence_naming_the_cell_and_the_key_before_anything_runs(case, world, tmp_path, capsys):
    base, cells, top, named = BAD_PLANS[case]
    plan = write_plan(tmp_path / "plan.toml", world, cells, base, **({"top": top} if top else {}))
    assert main(["study", str(plan), "--out", str(tmp_path / "study"), "--jobs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(plan) in err, err
    for part in named:
        assert part in err, (part, err)
    assert not (tmp_path / "study").exists()  # nothing ran, nothing was written


def test_a_plan_that_is_not_toml_names_its_line(tmp_path, capsys):
    (tmp_path / "plan.toml").write_text('seeds = [0\n[[cells]]\nname = "a"\n')
    assert main(["study", str(tmp_path / "plan.toml"), "--out", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid TOML" in err and "line " in err


# ---------------------------------------------------------------- the commands

def test_print_commands_gives_one_rerunnable_command_per_run(world, tmp_path, capsys):
    cells = (CELL_A + '[[cells]]\nname = "z"\nkind = "zero-shot"\n[[cells]]\nname = "p"\nkind = "linear-probe"\n'
             '[[cells]]\nname = "b"\nloss = "siglip"\nlogit_bias_init = "auto"\nbalanced_batches = true\nseeds = [3]\n')
    plan = write_plan(tmp_path / "plan.toml", world, cells, top='seeds = [0, 1]\nbaseline = "a"')
    assert main(["study", str(plan), "--out", str(tmp_path / "study"), "--print-commands"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 1 + 2 + 1  # a and p per seed, z once (no seed), b its own seed
    runs = {}
    for line in lines:
        words = shlex.split(line)
        assert words[:3] == ["python", "-m", "har_ref"]
        args = build_parser().parse_args(words[3:])  # the CLI's own parser takes it as it is
        runs[Path(args.out).relative_to(tmp_path / "study").as_posix()] = args
    assert sorted(runs) == ["a/seed0", "a/seed1", "b/seed3", "p/seed0", "p/seed1", "z/seed0"]
    assert {runs[k].command for k in runs} == {"train", "evaluate", "linear-probe"}
    assert all(a.resume == "auto" for a in runs.values() if a.command == "train")  # re-running resumes or skips
    assert runs["b/seed3"].seed == 3 and runs["b/seed3"].loss == "siglip" and runs["b/seed3"].balanced_batches
    assert runs["a/seed1"].model == "clip"  # the checkpoint's towers, read from its config.json
    assert not (tmp_path / "study").exists()


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(directory).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def checkpoint_micro_step(run: Path) -> int:
    state = run / "checkpoint" / "trainer_state.pt"
    try:
        return torch.load(state, map_location="cpu", weights_only=True)["micro_step"] if state.is_file() else 0
    except Exception:  # caught while being written
        return 0


def test_a_killed_study_run_again_keeps_finished_runs_and_resumes_the_killed_one(world, tmp_path):
    """The baseline a and zero-shot z finish; b (9 micro-batches, a checkpoint after each) is killed with the whole
    study (SIGKILL to its process group) after its second checkpoint. --report-only then lists b's seed as
    missing; the same command run again leaves a and z byte for byte and mtime as they were and ends b at the
    bytes of b run without a stop."""
    cells = (CELL_A + '[[cells]]\nname = "z"\nkind = "zero-shot"\n'
             '[[cells]]\nname = "b"\nepochs = 3\nlr = 1e-3\ncheckpoint_every = 1\nreference = "z"\n')
    plan = write_plan(tmp_path / "plan.toml", world, cells)
    out = tmp_path / "study"
    started = subprocess.Popen([sys.executable, "-m", "har_ref", "study", str(plan), "--out", str(out)], cwd=ROOT,
                               env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 600
    while checkpoint_micro_step(out / "b" / "seed0") < 2 and started.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(started.pid, signal.SIGKILL)
    started.wait()
    assert not (out / "b" / "seed0" / "metrics.json").exists(), "b finished before the kill; the test needs a slower b"
    kept = {name: snapshot(out / name / "seed0") for name in ("a", "z")}

    study(plan, "--out", out, "--report-only")
    partial = json.loads((out / "study.json").read_text())
    b = next(c for c in partial["cells"] if c["name"] == "b")
    assert b["missing"] == [0] and b["id"] is None and "- b seed 0" in (out / "report.md").read_text()

    done = study(plan, "--out", out)
    assert "2 finished (kept), 1 to run" in done.stdout
    for name, files in kept.items():
        assert snapshot(out / name / "seed0") == files, name
    reference = tmp_path / "uninterrupted"
    command = next(line for line in study(plan, "--out", out, "--print-commands").stdout.splitlines() if "/b/" in line)
    argv = shlex.split(command)[3:]
    argv[argv.index("--out") + 1] = str(reference)
    subprocess.run([sys.executable, "-m", "har_ref", *argv], check=True, cwd=ROOT, env=ONE_THREAD, capture_output=True)
    for name in ("model.safetensors", "predictions.csv", "predictions_shift.csv"):
        assert (out / "b" / "seed0" / name).read_bytes() == (reference / name).read_bytes(), name

    again = study(plan, "--out", out)  # all finished: no process starts, nothing changes
    assert "3 finished (kept), 0 to run" in again.stdout
    a = next(line for line in study(plan, "--out", out, "--print-commands").stdout.splitlines() if "/a/" in line)
    subprocess.run([sys.executable, "-m", "har_ref", *shlex.split(a)[3:]], check=True, cwd=ROOT, env=ONE_THREAD,
                   capture_output=True)  # a printed command run again on its finished run
    assert snapshot(out / "a" / "seed0") == kept["a"]

    check_study_json(json.loads((out / "study.json").read_text()), out)
    changed = write_plan(tmp_path / "changed.toml", world, cells.replace("lr = 1e-3", "lr = 2e-3"))
    refused = study(changed, "--out", out, ok=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "cell 'b', key 'lr'" in refused.stderr and "0.001" in refused.stderr and "0.002" in refused.stderr


def check_study_json(result: dict, out: Path) -> None:
    """The issue's schema, and the baseline's difference to itself: 0 with CI [0, 0]."""
    assert set(result) >= {"baseline", "cells", "wall_seconds"} and result["baseline"] == "a"
    split_keys = {"macro_f1", "mean", "sd", "per_class_f1"}
    for cell in result["cells"]:
        assert set(cell) >= {"name", "kind", "options", "resolved", "seeds", "id", "shift", "vs_baseline", "missing"}
        assert cell["missing"] == [] and cell["kind"] in ("train", "zero-shot")
        for split in ("id", "shift"):
            assert set(cell[split]) >= split_keys and len(cell[split]["per_class_f1"]) == 15
            assert cell[split]["mean"] == pytest.approx(sum(cell[split]["macro_f1"]) / len(cell[split]["macro_f1"]))
            assert set(cell["vs_baseline"][split]) >= {"macro_f1", "ci95", "mcnemar_p"}
            metrics = json.loads((out / cell["name"] / "seed0" / f"metrics{'' if split == 'id' else '_shift'}.json")
                                 .read_text())
            assert cell[split]["macro_f1"] == [pytest.approx(metrics["macro_f1"])]
    cells = {c["name"]: c for c in result["cells"]}
    assert cells["b"]["options"] == {"epochs": 3, "lr": 1e-3, "checkpoint_every": 1}
    assert cells["b"]["resolved"]["epochs"] == 3 and cells["b"]["resolved"]["micro_batch"] == 20
    for split in ("id", "shift"):
        assert cells["a"]["vs_baseline"][split] == {"macro_f1": 0.0, "ci95": [0.0, 0.0], "mcnemar_p": 1.0,
                                                    "seed_pairs": 1}
        d = cells["b"]["vs_baseline"][split]
        assert d["macro_f1"] == pytest.approx(cells["b"][split]["mean"] - cells["a"][split]["mean"])
        assert d["ci95"][0] <= d["macro_f1"] <= d["ci95"][1]
        assert cells["b"]["vs_reference"][split]["macro_f1"] == pytest.approx(
            cells["b"][split]["mean"] - cells["z"][split]["mean"])


# ---------------------------------------------------------------- the shipped plan

def test_the_shipped_plan_checks_and_its_negatives_cells_see_the_same_images_in_whole_steps(tmp_path, monkeypatch):
    """claims.toml on a world of the demo's size (its 100 training images per class): every cell passes the
    CLI's parser; the negatives grid's cells see the same images, make whole steps (80, 20, 5) and the memory
    joins in each one that has one."""
    generate(tmp_path / "runs" / "study" / "data", test_per_class=1, shift_per_class=1, image_size=16, seed=0)
    for family in ("clip", "siglip"):
        convert_hf(CHECKPOINTS / family, tmp_path / "runs" / "study" / "weights" / family)
    monkeypatch.chdir(tmp_path)  # the plan's paths are relative to the directory the study runs from
    plan = load_plan(CLAIMS)
    assert len(plan.runs(tmp_path)) == 2 + 2 * 3 + 29 * 3
    cells = {c.name: c for c in plan.cells}
    grid = [c for c in plan.cells if c.name.startswith(("infonce-", "sigmoid-"))] + [
        cells["clip"], cells["clip-towers-sigmoid-loss"]]
    seen = {}
    for cell in grid:
        s = schedule(cell, {})
        seen[cell.name] = s["images_seen"]
        assert s["steps"] * s["contrastive_batch"] == s["images_seen"] == 5120, cell.name
        assert s["memory"] == 0 or s["memory_joins_at_step"] == 2, cell.name
    assert len(grid) == 18 and len(set(seen.values())) == 1
    assert {(c.resolved["accum_steps"] * 64, c.resolved["xbm_size"], c.resolved["loss"]) for c in grid} == {
        (b, m, loss) for b in (64, 256, 1024) for m in (0, 1024, 4096) for loss in ("clip", "siglip")}
    assert cells["clip-0-epochs"].resolved["epochs"] == 0 and cells["siglip"].resolved["model"] == "siglip"
    # the towers x loss grid: its four cells, and each change compares the two cells that differ in it only
    assert {key: c.name for key, c in grid_cells(plan).items()} == {
        ("clip", "clip"): "clip", ("clip", "siglip"): "clip-towers-sigmoid-loss",
        ("siglip", "siglip"): "siglip", ("siglip", "clip"): "siglip-towers-infonce-loss"}
    (tmp_path / "predictions.csv").touch()
    (tmp_path / "predictions_shift.csv").touch()
    monkeypatch.setattr(report, "versus", lambda runs_a, runs_b, suffix: (runs_a["name"], runs_b["name"]))
    changes = towers_x_loss(plan, {c.name: {0: tmp_path, "name": c.name} for c in plan.cells})
    assert [(c["change"], c["id"]) for c in changes] == [
        ("sigmoid - InfoNCE loss, CLIP towers", ("clip", "clip-towers-sigmoid-loss")),
        ("sigmoid - InfoNCE loss, SigLIP towers", ("siglip-towers-infonce-loss", "siglip")),
        ("SigLIP - CLIP towers, InfoNCE loss", ("clip", "siglip-towers-infonce-loss")),
        ("SigLIP - CLIP towers, sigmoid loss", ("clip-towers-sigmoid-loss", "siglip"))]


def test_the_shipped_plan_refuses_a_missing_checkpoint_in_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PlanError, match=r"cell 'clip', key 'weights' \(from \[base\]\): runs/study/weights/clip/"
                                        r"config.json not found"):
        load_plan(CLAIMS)
