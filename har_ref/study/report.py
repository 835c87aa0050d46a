"""A study's results: DIR/study.json, DIR/report.md and the pictures beside it, from whatever runs are
finished (missing seeds are listed, never guessed).

Per cell and split ("id": the test split, "shift": the shifted test split), macro-F1 per seed, their mean
and sd, the 95% bootstrap CI of the mean (eval/multi_seed.py::score), the mean per-class F1, and the
difference cell - baseline (eval/multi_seed.py::difference): a paired bootstrap over the test images, the
same draw for every seed pair (seed k against seed k; a single run, zero-shot, against every seed), and
McNemar's exact p on the discordant pairs pooled over the seed pairs.

study.json:
    {"plan", "baseline", "wall_seconds" (this invocation of the study command, from its start to the report's
     numbers: the runs and the bootstraps, not the pictures), "controls": [controls()],
     "towers_x_loss": [{"change", "a", "b", "id": as vs_baseline["id"], "shift": same}] (towers_x_loss()),
     "cells": [{"name", "kind", "options" (the cell's own options), "resolved" (every option of its runs),
                "seeds", "missing" (seeds without a finished run),
                "id": {"macro_f1": [per seed], "mean", "sd", "ci95", "per_class_f1": {class: mean}} | null,
                "shift": {same} | null,
                "vs_baseline": {"id": {"macro_f1": d, "ci95": [lo, hi], "mcnemar_p": p, "seed_pairs": n} | null,
                                "shift": {same} | null},
                "reference": the plan's reference cell | null, "vs_reference": {"id", "shift"} as vs_baseline | null,
                "schedule": schedule() (train cells only)}]}

Pictures: macro-F1 against the negatives per step (negatives_id.png, negatives_shift.png), the towers x
loss grid (towers_x_loss.png), and the per-class F1 differences to the baseline (class_differences_id.png,
class_differences_shift.png). Cells enter a picture by their options, not by name: the negatives picture
holds the train cells that differ from the baseline in the loss and the batch and memory settings only;
the towers x loss grid those that differ in the checkpoint and the loss only.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from ..data.folders import build_splits, hold_out
from ..eval.heatmaps import plot_difference_heatmap, plot_score_grid
from ..eval.multi_seed import difference, predictions, score
from ..eval.metrics import compute_metrics
from ..eval.run_results import read_log
from ..eval.xy_charts import plot_lines_with_bands
from ..train.checkpoint import changed_values
from .plan import Cell, Plan
from .runner import finished

SPLITS = {"id": "", "shift": "_shift"}  # study.json key -> the run directory's file suffix
SPLIT_NAMES = {"id": "test split (ID)", "shift": "shifted test split"}
LOSS_NAMES = {"clip": "InfoNCE", "siglip": "sigmoid"}
# the negatives picture: a loss's colour (CLIP's blue, SigLIP's orange), darker for a larger batch
LOSS_SHADES = {"clip": ((107, 174, 214), (31, 119, 180), (8, 48, 107)),
               "siglip": ((253, 174, 107), (230, 110, 0), (140, 45, 4))}
TOWER_NAMES = {"clip": "CLIP towers", "siglip": "SigLIP towers"}
LOSS_KEYS = ("loss", "logit_bias_init")  # the loss, and where a sigmoid loss's b starts
NEGATIVES_KEYS = ("micro_batch", "accum_steps", "xbm_size", "xbm_warmup_steps")
TOWER_KEYS = ("weights", "model")


# ---------------------------------------------------------------- the numbers

def finished_runs(cell: Cell, out: Path) -> dict[int, Path]:
    return {seed: cell.run(out, seed).directory for seed in cell.seeds if finished(cell, cell.run(out, seed))}


def split_result(runs: list[Path], suffix: str) -> dict:
    """Macro-F1 per seed, mean, sd, the CI of the mean, and the mean per-class F1 over seeds."""
    s = score(runs, suffix)
    y_true, pred, class_names, _ = predictions(runs, suffix)
    per_class = np.mean([[m["per_class"][c]["f1"] for c in class_names]
                         for m in (compute_metrics(y_true, p, class_names) for p in pred)], axis=0)
    return {"macro_f1": s["seeds_macro_f1"], "mean": s["macro_f1"], "sd": s["sd_macro_f1"], "ci95": s["ci95"],
            "per_class_f1": {c: float(v) for c, v in zip(class_names, per_class)}}


def versus(baseline: dict[int, Path], runs: dict[int, Path], suffix: str) -> dict | None:
    """cell - baseline: seed k against seed k over the seeds both finished; a single run against every seed."""
    if len(baseline) == 1 or len(runs) == 1:
        a, b = list(baseline.values()), list(runs.values())
    else:
        common = sorted(set(baseline) & set(runs))
        a, b = [baseline[s] for s in common], [runs[s] for s in common]
    if not a or not b:
        return None
    d = difference(a, b, suffix)
    return {"macro_f1": d["macro_f1"], "ci95": d["ci95"], "mcnemar_p": d["mcnemar_p"],
            "seed_pairs": max(len(a), len(b))}


def schedule(cell: Cell, runs: dict[int, Path]) -> dict:
    """What a train cell's options make of its training set (train/loop.py, train/xbm.py): micro-batches of
    micro_batch images (a partial last one dropped), an optimizer step every accum_steps of them (and one for
    a partial rest at the end), the contrastive batch (the effective batch in cached mode, the micro-batch in
    independent mode), and the step the memory joins: it is read from the enqueue after xbm_warmup_steps
    enqueues (and never while empty), and enqueues count steps in cached mode, micro-batches in independent
    mode. Counted from the file list of train/ (an unreadable image, which train skips, counts here)."""
    cfg = cell.resolved
    images = len(hold_out(build_splits(cfg["data"])[0], cfg["val_fraction"])[0])
    micro_batches = cfg["epochs"] * (images // cfg["micro_batch"])
    steps = math.ceil(micro_batches / cfg["accum_steps"])
    cached = cfg["accum_mode"] == "cached"
    batch = cfg["micro_batch"] * cfg["accum_steps"] if cached else cfg["micro_batch"]
    joins = None
    if cfg["xbm_size"]:
        first_read = max(cfg["xbm_warmup_steps"], 1) + 1  # the enqueue whose batch first reads the memory
        joins = first_read if cached else math.ceil(first_read / cfg["accum_steps"])
    logs = [read_log(d / "log.jsonl") for d in runs.values()]
    return {"train_images": images, "images_seen": micro_batches * cfg["micro_batch"], "contrastive_batch": batch,
            "memory": cfg["xbm_size"], "negatives_per_step": batch + cfg["xbm_size"], "steps": steps,
            "memory_joins_at_step": joins if joins is not None and joins <= steps else None,
            "memory_rows_at_end": [log[-1]["memory_rows"] for log in logs if log],
            "logit_scale_at_end": [log[-1]["logit_scale"] for log in logs if log],
            "logit_bias_at_end": [log[-1]["logit_bias"] for log in logs if log and log[-1]["logit_bias"] is not None]}


def gather(plan: Plan, out: Path, started: float) -> dict:
    """study.json's dict from the finished runs under OUT; `started`: time.perf_counter() at the command's start."""
    finished = {cell.name: finished_runs(cell, out) for cell in plan.cells}
    baseline = finished[plan.baseline]
    cells = []
    for cell in plan.cells:
        runs = finished[cell.name]
        entry = {"name": cell.name, "kind": cell.kind, "options": cell.options, "resolved": cell.resolved,
                 "seeds": cell.seeds, "missing": [s for s in cell.seeds if s not in runs]}
        suffixes = {split: suffix for split, suffix in SPLITS.items()
                    if runs and (next(iter(runs.values())) / f"predictions{suffix}.csv").is_file()}
        for split in SPLITS:
            entry[split] = split_result(list(runs.values()), SPLITS[split]) if split in suffixes else None
        entry["vs_baseline"] = {split: versus(baseline, runs, SPLITS[split]) if split in suffixes and baseline
                                else None for split in SPLITS}
        reference = finished.get(cell.reference)
        entry["reference"] = cell.reference
        entry["vs_reference"] = None if cell.reference is None else {
            split: versus(reference, runs, SPLITS[split]) if split in suffixes and reference else None
            for split in SPLITS}
        if cell.kind == "train":
            entry["schedule"] = schedule(cell, runs)
        cells.append(entry)
    controls_found = controls(plan, finished, {e["name"]: e for e in cells})
    return {"plan": str(plan.path), "baseline": plan.baseline, "cells": cells, "controls": controls_found,
            "towers_x_loss": towers_x_loss(plan, finished),
            "wall_seconds": round(time.perf_counter() - started, 1)}


def grid_cells(plan: Plan) -> dict[tuple[str, str], Cell]:
    """The towers x loss grid: (towers, loss) -> the first cell that differs from the baseline in the
    checkpoint and the loss only."""
    baseline, grid = plan.cell(plan.baseline), {}
    for cell in plan.cells:
        if differs_only_in(cell, baseline, LOSS_KEYS + TOWER_KEYS):
            grid.setdefault((cell.resolved["model"], cell.resolved["loss"]), cell)
    return grid


def towers_x_loss(plan: Plan, finished: dict[str, dict[int, Path]]) -> list[dict]:
    """The grid's four one-factor changes, each b - a with the other factor held: the loss on each
    family's towers, the towers under each loss. Empty unless all four cells exist."""
    grid = grid_cells(plan)
    if len(grid) < 4:
        return []
    changes = [(f"sigmoid - InfoNCE loss, {TOWER_NAMES[t]}", grid[(t, "clip")], grid[(t, "siglip")]) for t in TOWER_NAMES]
    changes += [(f"SigLIP - CLIP towers, {LOSS_NAMES[loss]} loss", grid[("clip", loss)], grid[("siglip", loss)])
                for loss in LOSS_NAMES]
    found = []
    for change, a, b in changes:
        runs_a, runs_b = finished[a.name], finished[b.name]
        found.append({"change": change, "a": a.name, "b": b.name, **{
            split: versus(runs_a, runs_b, suffix) if runs_a and runs_b
            and (next(iter(runs_a.values())) / f"predictions{suffix}.csv").is_file() else None
            for split, suffix in SPLITS.items()}})
    return found


def controls(plan: Plan, finished: dict[str, dict[int, Path]], entries: dict[str, dict]) -> list[dict]:
    """The harness's two controls, each against the zero-shot cell of the same checkpoint: a 0-epoch run must
    predict exactly as zero-shot (predictions files equal byte for byte), and a run on shuffled labels must
    fall below zero-shot by more than the CI (the CI of shuffled - zero-shot below 0) and to chance: its
    macro-F1's CI (its study.json entry's, `entries`) no higher than a uniform guess's 1/K (a guess that
    favours some classes scores lower)."""
    found = []
    for cell in plan.cells:
        if cell.kind != "train" or not (cell.resolved["epochs"] == 0 or cell.resolved["shuffle_labels"]):
            continue
        zero_shot = next((z for z in plan.cells if z.kind == "zero-shot"
                          and z.resolved["weights"] == cell.resolved["weights"]), None)
        runs = finished[cell.name]
        reference = finished[zero_shot.name] if zero_shot else {}
        entry = {"cell": cell.name, "zero_shot": zero_shot.name if zero_shot else None,
                 "test": "equals zero-shot" if cell.resolved["epochs"] == 0 else "below zero-shot, down to chance"}
        for split, suffix in SPLITS.items():
            own = entries[cell.name][split]  # split_result: the cell's mean macro-F1 and its CI
            if not own or not reference or not (next(iter(reference.values())) / f"predictions{suffix}.csv").is_file():
                entry[split] = None
            elif cell.resolved["epochs"] == 0:
                zs = (next(iter(reference.values())) / f"predictions{suffix}.csv").read_bytes()
                same = [(d / f"predictions{suffix}.csv").read_bytes() == zs for d in runs.values()]
                entry[split] = {"identical_runs": sum(same), "runs": len(same), "holds": all(same)}
            else:
                d = versus(reference, runs, suffix)
                chance = 1 / len(own["per_class_f1"])
                below, at_chance = d["ci95"][1] < 0, own["ci95"][1] <= chance
                entry[split] = {**d, "macro_f1_mean": own["mean"], "macro_f1_ci95": own["ci95"],
                                "chance_macro_f1": chance, "below_zero_shot": below, "at_chance": at_chance,
                                "holds": below and at_chance}
        found.append(entry)
    return found


# ---------------------------------------------------------------- the pictures

def differs_only_in(cell: Cell, baseline: Cell, keys: tuple[str, ...]) -> bool:
    return cell.kind == "train" == baseline.kind and all(
        key in keys for key, _, _ in changed_values(baseline.resolved, cell.resolved))


def draw_pictures(plan: Plan, study: dict, out: Path) -> list[str]:
    """The pictures the results allow, written under OUT; returns their file names."""
    baseline, drawn = plan.cell(plan.baseline), []
    entries = {e["name"]: e for e in study["cells"]}
    for split in SPLITS:
        negatives = [(c, entries[c.name]) for c in plan.cells if differs_only_in(c, baseline, LOSS_KEYS + NEGATIVES_KEYS)
                     and entries[c.name][split]]
        lines: dict[tuple[str, int], list] = {}  # one line per loss and batch, through its memory sizes
        for cell, e in negatives:
            s = e["schedule"]
            lines.setdefault((cell.resolved["loss"], s["contrastive_batch"]), []).append(
                (s["negatives_per_step"], e[split]["mean"], *e[split]["ci95"]))
        if sum(len(points) for points in lines.values()) >= 2:
            name = f"negatives_{split}.png"
            order = sorted(lines)
            shades = {key: LOSS_SHADES[key[0]][[k for k in order if k[0] == key[0]].index(key) % 3] for key in order}
            plot_lines_with_bands({f"{LOSS_NAMES[loss]}, batch {batch}": lines[(loss, batch)] for loss, batch in order},
                                  out / name, f"Macro-F1 on the {SPLIT_NAMES[split]} against the negatives",
                                  "Negatives per step: contrastive batch + memory (log scale); "
                                  "a line joins one batch's memory sizes",
                                  "Macro-F1 (mean over seeds, 95% CI band)", log_x=True,
                                  colors={f"{LOSS_NAMES[k[0]]}, batch {k[1]}": shades[k] for k in order})
            drawn.append(name)
    grid = {key: entries[cell.name] for key, cell in grid_cells(plan).items() if entries[cell.name]["id"]}
    splits = [s for s in SPLITS if all(e[s] for e in grid.values())]
    if len(grid) == 4:
        columns = [(split, loss) for split in splits for loss in LOSS_NAMES]
        values = [[grid[(towers, loss)][split]["mean"] for split, loss in columns] for towers in TOWER_NAMES]
        plot_score_grid(values, list(TOWER_NAMES.values()), [f"{LOSS_NAMES[loss]}, {split}" for split, loss in columns],
                        "Towers x loss: macro-F1, mean over seeds", "Loss, split", "Towers", out / "towers_x_loss.png")
        drawn.append("towers_x_loss.png")
    base_entry = entries[plan.baseline]
    for split in SPLITS:
        rows = [e for e in study["cells"] if e["name"] != plan.baseline and e[split]]
        if not base_entry[split] or not rows:
            continue
        classes = list(base_entry[split]["per_class_f1"])
        values = [[e[split]["per_class_f1"][c] - base_entry[split]["per_class_f1"][c] for c in classes] for e in rows]
        name = f"class_differences_{split}.png"
        plot_difference_heatmap(values, [e["name"] for e in rows], classes,
                                f"Per-class F1, cell - {plan.baseline}, {SPLIT_NAMES[split]}", "Class", "Cell",
                                out / name)
        drawn.append(name)
    return drawn


# ---------------------------------------------------------------- report.md

def fmt_score(result: dict | None) -> str:
    if not result:
        return "-"
    return f"{result['mean']:.3f} ± {result['sd']:.3f} (n={len(result['macro_f1'])})"


def fmt_difference(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{d['macro_f1']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], p = {d['mcnemar_p']:.2g}"


def fmt_options(options: dict) -> str:
    return ", ".join(f"{k} = {v!r}" for k, v in options.items()) or "[base]"


def markdown(plan: Plan, study: dict, pictures: list[str]) -> str:
    cells = study["cells"]
    lines = [f"# Study: {plan.path}", "",
             f"{len(cells)} cells, seeds {plan.seeds}. Every difference is macro-F1, cell - baseline (`{plan.baseline}`) "
             "or cell - its reference cell, with its 95% CI from a paired bootstrap over seeds and test images (the "
             "same draw for every seed pair) and McNemar's exact p on the discordant pairs pooled over seed pairs.",
             "", "| cell | kind | options (over [base]) | reference | seeds finished |", "|---|---|---|---|---|"]
    for e in cells:
        done = [s for s in e["seeds"] if s not in e["missing"]]
        lines.append(f"| {e['name']} | {e['kind']} | {fmt_options(e['options'])} | {e['reference'] or '-'} | "
                     f"{len(done)} of {len(e['seeds'])} |")
    for split in SPLITS:
        lines += ["", f"## Macro-F1 on the {SPLIT_NAMES[split]}", "",
                  "| cell | mean ± sd over seeds (n) | cell - baseline [95% CI], McNemar p | cell - reference [95% CI], "
                  "McNemar p |", "|---|---|---|---|"]
        for e in cells:
            versus_reference = (e["vs_reference"] or {}).get(split)
            lines.append(f"| {e['name']} | {fmt_score(e[split])} | {fmt_difference(e['vs_baseline'][split])} | "
                         + (f"{e['reference']}: {fmt_difference(versus_reference)}" if e["reference"] else "-") + " |")
    if study.get("towers_x_loss"):
        lines += ["", "## Towers x loss: each change with the other held", "",
                  "The grid's four cells compared in pairs that differ in one factor: b - a, macro-F1, 95% CI and "
                  "McNemar p as above.", "", "| change | a | b | ID | shift |", "|---|---|---|---|---|"]
        for c in study["towers_x_loss"]:
            lines.append(f"| {c['change']} | {c['a']} | {c['b']} | {fmt_difference(c['id'])} | "
                         f"{fmt_difference(c['shift'])} |")
    lines += ["", "## Training schedules: batch, memory, steps", "",
              "Per train cell: the contrastive batch (cached accumulation: the effective batch; independent: the "
              "micro-batch), the memory, images seen, the optimizer steps made and the step the memory joined "
              "(after its warm-up; `never` if it did not), and per seed the memory's rows, t (the log of the "
              "logit scale; CLIP's clamp is at ln 100 = 4.605) and the sigmoid loss's b at the end of training.",
              "", "| cell | loss | batch | memory | negatives per step | images seen | steps | memory joins at step "
              "| memory rows at the end | t at the end | b at the end |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in cells:
        s = e.get("schedule")
        if s:
            joins = "-" if not s["memory"] or not s["steps"] else s["memory_joins_at_step"] or "never"
            lines.append(f"| {e['name']} | {LOSS_NAMES[e['resolved']['loss']]} | {s['contrastive_batch']} | "
                         f"{s['memory']} | {s['negatives_per_step']} | {s['images_seen']} | {s['steps']} | {joins} | "
                         f"{', '.join(map(str, s['memory_rows_at_end'])) or '-'} | "
                         f"{', '.join(f'{t:.3f}' for t in s['logit_scale_at_end']) or '-'} | "
                         f"{', '.join(f'{b:.3f}' for b in s.get('logit_bias_at_end', [])) or '-'} |")
    lines += ["", "## Controls", ""]
    for c in study["controls"]:
        for split in SPLITS:
            r = c[split]
            if r is None:
                lines.append(f"- {c['cell']} ({split}): not available (no finished run, or no zero-shot cell of "
                             "the same checkpoint).")
            elif c["test"] == "equals zero-shot":
                lines.append(f"- {c['cell']} ({split}): predictions identical to {c['zero_shot']}'s in "
                             f"{r['identical_runs']} of {r['runs']} runs: " + ("holds." if r["holds"] else
                                                                             "FAILS: the harness is wrong."))
            else:
                lo, hi = r["macro_f1_ci95"]
                lines.append(f"- {c['cell']} ({split}): {c['cell']} - {c['zero_shot']} = {fmt_difference(r)}, "
                             + ("below zero-shot by more than the CI" if r["below_zero_shot"] else
                                "NOT below zero-shot by more than the CI") +
                             f"; macro-F1 {r['macro_f1_mean']:.3f} [{lo:.3f}, {hi:.3f}] against chance's "
                             f"{r['chance_macro_f1']:.3f}, " + ("no better than chance" if r["at_chance"] else
                                                               "NOT down to chance") +
                             (": holds." if r["holds"] else ": FAILS (docs/study.md, Controls, says what that means)."))
    if pictures:
        lines += ["", "## Pictures", "",
                  "A band or whisker is one cell's own 95% CI. Whether two cells differ is the paired CI of the tables, "
                  "narrower, since both cells are scored on the same images.", ""] + [f"![{p}]({p})" for p in pictures]
    missing = [(e["name"], s) for e in cells for s in e["missing"]]
    lines += ["", "## Missing runs", ""]
    lines += [f"- {name} seed {seed}" for name, seed in missing] or ["None: every cell has every seed."]
    lines += ["", f"Wall time of this invocation, to the report's numbers (the pictures not counted): "
              f"{study['wall_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def write_report(plan: Plan, out: Path, started: float) -> Path:
    """DIR/study.json, DIR/report.md and the pictures; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    study = gather(plan, out, started)
    (out / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    pictures = draw_pictures(plan, study, out)
    (out / "report.md").write_text(markdown(plan, study, pictures))
    return out / "report.md"
