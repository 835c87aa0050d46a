"""A plan's runs, each an ordinary `python -m har_ref train|evaluate|linear-probe` subprocess, so that a
study can be stopped at any moment (Ctrl-C, a kill, a lost machine) and the same command run again.

- A finished run (every file its command writes last is there: `finished`) is kept as it is, and no
  process is started for it.
- Any other run is started with its command (plan.py::Run.command). train's --resume auto continues a
  run from its last checkpoint, bit for bit, and starts an empty one (train/checkpoint.py::auto_resume).
- Before anything runs, what each cell ran with (DIR/<cell>/cell.json, written when it first runs) and
  what each train run recorded (its train_config.json) are compared with the plan: a run of other
  options is refused in one sentence, never reused.
- --jobs N runs N at once, each on one thread (OMP_NUM_THREADS=1); run k's output goes to DIR/logs/.
  After a failed run no new one starts; the ones running finish, and the report shows what exists.
- --print-commands prints the runs' commands instead, one a line, for a scheduler (a SLURM job array,
  GNU parallel); `--report-only` then gathers what they made.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..train.checkpoint import changed_options, changed_values
from ..train.config import TrainConfig
from ..train.faults import TrainingStopped
from .plan import Cell, Plan, PlanError, Run

LAST_FILES = ("metrics{}.json", "predictions{}.csv", "confusion{}.png")  # per split, the files a run writes last
POLL_S = 0.5


def split_suffixes(cell: Cell) -> list[str]:
    """"" (the test split) and, when the data has the cell's shifted split, "_shift"."""
    shift = cell.resolved.get("shift_split")
    return [""] + (["_shift"] if shift and (Path(cell.resolved["data"]) / shift).is_dir() else [])


def finished(cell: Cell, run: Run) -> bool:
    return all((run.directory / name.format(s)).is_file() for s in split_suffixes(cell) for name in LAST_FILES)


def check_recorded(plan: Plan, out: Path) -> None:
    """Refuse (PlanError) when DIR already holds runs of a cell made with other options than the plan's now."""
    for cell in plan.cells:
        recorded = out / cell.name / "cell.json"
        if recorded.is_file():
            then = json.loads(recorded.read_text())
            changed = changed_values(then["resolved"], cell.resolved)
            if then["kind"] != cell.kind or changed:
                key, was, now = changed[0] if changed else ("kind", then["kind"], cell.kind)
                raise PlanError(f"{plan.path}: cell {cell.name!r}, key {key!r}: {out / cell.name} holds runs made with "
                                f"{key} = {was!r}, the plan now says {now!r}; restore the value, or rename the cell "
                                "(or pass another --out) to run it anew.")
        for seed in cell.seeds if cell.kind == "train" else ():
            saved = cell.run(out, seed).directory / "train_config.json"
            if saved.is_file():
                changed = changed_options(TrainConfig.load(saved), cell.train_config(seed))
                if changed:
                    key, was, now = changed[0]
                    raise PlanError(f"{plan.path}: cell {cell.name!r}, key {key!r}: {saved.parent} was trained with "
                                    f"{key} = {was!r}, the plan now says {now!r}; restore the value, or move that "
                                    "run away to run it anew.")


def record(cell: Cell, out: Path) -> None:
    """DIR/<cell>/cell.json: what the cell's runs are made with, for check_recorded on the next start."""
    path = out / cell.name / "cell.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kind": cell.kind, "options": cell.options, "resolved": cell.resolved},
                                   indent=2) + "\n")


def print_commands(plan: Plan, out: Path) -> None:
    for run in plan.runs(out):
        print(run.command())


def run_study(plan: Plan, out: Path, jobs: int) -> list[str]:
    """Every run of the plan not yet finished, `jobs` at a time; returns one line per failed run."""
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}.")
    check_recorded(plan, out)
    runs = plan.runs(out)
    todo = [run for run in runs if not finished(plan.cell(run.cell), run)]
    print(f"[study] {plan.path}: {len(plan.cells)} cells, {len(runs)} runs; {len(runs) - len(todo)} finished "
          f"(kept), {len(todo)} to run, {jobs} at a time (one thread each); logs in {out / 'logs'}", flush=True)
    for cell in plan.cells:
        if any(run.cell == cell.name for run in todo):
            record(cell, out)
    return execute(plan, todo, out / "logs", jobs)


def execute(plan: Plan, runs: list[Run], logs: Path, jobs: int) -> list[str]:
    """Start the runs as subprocesses, `jobs` at a time; stop starting new ones after a failure or a signal
    (Ctrl-C reaches the runs themselves; a SIGTERM to the study is passed on to them: train stops cleanly)."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    queue, running, failures, done = list(runs), {}, [], 0
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        while queue or running:
            while queue and len(running) < jobs and not failures:
                run = queue.pop(0)
                log = logs / f"{run.cell}-seed{run.seed}.log"
                with open(log, "w") as f:  # the child holds its own copy of the file
                    process = subprocess.Popen([sys.executable, "-m", "har_ref", *run.argv], stdout=f,
                                               stderr=subprocess.STDOUT, env=env)
                running[process] = (run, log, time.perf_counter())
                print(f"[study] start {run.cell} seed {run.seed}: {run.command()}", flush=True)
            time.sleep(POLL_S)
            for process in [p for p in running if p.poll() is not None]:
                run, log, start = running.pop(process)
                done += 1
                took = f"{time.perf_counter() - start:.0f} s"
                if process.returncode == 0 and finished(plan.cell(run.cell), run):
                    print(f"[study] {done}/{len(runs)} {run.cell} seed {run.seed}: finished in {took}", flush=True)
                    continue
                last = (log.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1].rstrip(".")
                failures.append(f"{run.cell} seed {run.seed} (exit {process.returncode}: {last}; log {log})")
                print(f"[study] {run.cell} seed {run.seed} failed after {took}: {last}; no new runs start",
                      file=sys.stderr, flush=True)
    except (KeyboardInterrupt, Terminated) as stop:
        for process in running:  # Ctrl-C reached them already; a SIGTERM did not
            if isinstance(stop, Terminated) and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in running:
            process.wait()
        raise TrainingStopped("study stopped: finished runs are kept and stopped train runs hold their last "
                              "checkpoint; run the same command again to continue.", exit_code=130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    return failures


class Terminated(Exception):
    """SIGTERM reached the study."""


def _raise_terminated(signum, frame):
    raise Terminated()
