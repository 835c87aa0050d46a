"""Time of the report's section "What each model looks at" (har_ref/eval/report_maps.py::explain_section),
stage by stage, on a demo output directory, and its pointing-game table.

    PYTHONPATH=. .venv/bin/python tests/bench/bench_report_maps.py --demo runs/demo [--threads 2]

DIR is laid out as `make demo` writes it: DIR/data (the world, with boxes.json), DIR/weights/<family> (the
converted pretrained checkpoints) and DIR/<family>/seed0 (the fine-tuned runs). The demo's main process
draws the report with torch's default threads (2 on a 2-core machine), hence --threads 2. Target: well
under 30 s for 1,500 test images of 64 px (the section also scans test_shift/ when the runs scored it).
Prints wall and CPU time (user + system, all threads) per stage and the machine's load average.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from har_ref.eval import report_maps
from har_ref.eval.report import _model_names, comparison_numbers
from har_ref.eval.run_results import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    demo = args.demo
    a, b = load_run(demo / "clip" / "seed0"), load_run(demo / "siglip" / "seed0")
    names = _model_names(a, b)
    numbers = comparison_numbers(a, b, 100, 0)
    inputs = report_maps.ExplainInputs(demo / "data", {f: demo / "weights" / f for f in ("clip", "siglip")})
    out = Path(tempfile.mkdtemp(prefix="bench_report_maps_"))
    clock = [time.perf_counter(), time.process_time()]
    stages = {}

    def lap(name: str) -> None:
        now = [time.perf_counter(), time.process_time()]
        stages[name] = (now[0] - clock[0], now[1] - clock[1])
        clock[:] = now

    models = report_maps.section_models((a, b), names, inputs)
    lap("load 4 models, class embeddings")
    flat = [w for run_models in models for w in run_models]
    index = {c: k for k, c in enumerate(a.class_names)}
    test = report_maps.scan(flat, a.paths, np.array([index[t] for t in a.true]), inputs.batch_size)
    lap(f"scan test ({len(a.paths)} images x {len(flat)} models)")
    shift = load_run(a.directory, "_shift")
    scans = {"test": test,
             "test_shift": report_maps.scan(flat, shift.paths, np.array([index[t] for t in shift.true]),
                                            inputs.batch_size)}
    lap(f"scan test_shift ({len(shift.paths)} images x {len(flat)} models)")
    report_maps.draw_pairs(a, names, numbers, models, test, inputs.data, out, 0)
    lap("3 pair pictures (class maps of 12 images)")
    report_maps.draw_embedding_map(models, test, a.class_names, out)
    lap("embedding map")
    pointing = report_maps.pointing_numbers(models, scans, report_maps.read_boxes(inputs.data), inputs.data)
    lap("pointing game")
    for name, (wall, cpu) in stages.items():
        print(f"{name:45s} wall {wall:6.2f} s  CPU {cpu:6.2f} s")
    print(f"{'total':45s} wall {sum(w for w, _ in stages.values()):6.2f} s  "
          f"CPU {sum(c for _, c in stages.values()):6.2f} s  (load average {os.getloadavg()[0]:.1f}, "
          f"{args.threads} threads)")
    print("\n".join(report_maps.pointing_table(pointing)))
    for split, runs in pointing["fine_tuned_minus_zero_shot"].items():
        print(split, "fine_tuned_minus_zero_shot", runs)
    print(f"pictures in {out}")


if __name__ == "__main__":
    main()
