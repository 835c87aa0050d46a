"""CLIP-vs-SigLIP report: markdown tables and pictures from two run directories.

`compare_runs(run_a, run_b, out_dir)` reproduces sections 5-7 of the study (Table 1, Table 2,
confusion matrices, training dynamics, compare_viz) and adds what a reader needs to judge the
gap: paired bootstrap CIs, an exact McNemar test and calibration (ECE, reliability diagram).

Every metric is recomputed from the two predictions.csv files after aligning them image by
image (by path), so both models are scored on exactly the same test images. Every difference
in the report is A - B, A being the first run given, except the closing verdict lines, which name
theirs as B - A ("SigLIP - CLIP" for `compare runs/clip runs/siglip`).
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..model.transforms import load_image
from .compare_viz import compare_grid, compare_panel
from .drawing import display_name
from .heatmaps import plot_confusion
from .metrics import compute_metrics, mcnemar_exact, paired_bootstrap, reliability_diagram_data, softmax
from .multi_seed import verdict
from .report_maps import ExplainInputs, explain_section
from .run_results import RunResults, align, load_run
from .xy_charts import plot_epoch_times, plot_loss_curves, plot_reliability, plot_wise_ft

ECE_BINS = 15  # as evaluate.py writes metrics.json


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "model"


def _model_names(a: RunResults, b: RunResults) -> tuple[str, str]:
    """Display names; two runs of one family are told apart by their directory names."""
    if a.name != b.name:
        return a.name, b.name
    return f"{a.name} ({a.directory.name})", f"{b.name} ({b.directory.name})"


# ---------------------------------------------------------------------------- numbers


def comparison_numbers(a: RunResults, b: RunResults, n_resamples: int, seed: int) -> dict:
    """Every number in the report, from the two aligned prediction sets."""
    order = align(a, b)
    index = {name: k for k, name in enumerate(a.class_names)}
    y_true = np.array([index[t] for t in a.true], dtype=np.int64)
    pred_a = np.array([index[p] for p in a.pred], dtype=np.int64)
    pred_b = np.array([index[b.pred[i]] for i in order], dtype=np.int64)
    reliability = {
        "a": reliability_diagram_data(softmax(a.scores), y_true, ECE_BINS),
        "b": reliability_diagram_data(softmax(b.scores[order]), y_true, ECE_BINS),
    }
    # paired_bootstrap reports (its b) - (its a); passing B first makes every difference A - B.
    bootstrap = paired_bootstrap(y_true, pred_b, pred_a, a.class_names, n_resamples, seed)
    return {
        "num_images": int(y_true.size),
        "metrics": {"a": compute_metrics(y_true, pred_a, a.class_names),
                    "b": compute_metrics(y_true, pred_b, a.class_names)},
        "ece": {k: v["ece"] for k, v in reliability.items()},
        "reliability": reliability,
        "bootstrap": {m: {k: bootstrap[m][k] for k in ("difference", "ci95_low", "ci95_high", "fraction_difference_le_0")}
                      for m in ("macro_f1", "accuracy")},
        "n_resamples": n_resamples,
        "seed": seed,
        "mcnemar": mcnemar_exact(y_true, pred_a, pred_b),  # b: only A right, c: only B right
        "correct": {"a": (pred_a == y_true).tolist(), "b": (pred_b == y_true).tolist()},
        "pred_b_aligned": [a.class_names[k] for k in pred_b],
    }


def verdict_lines(names: tuple[str, str], numbers: dict) -> list[str]:
    """One line per metric: B - A with its 95% paired-bootstrap CI and McNemar's p, and whether both call it
    significant at 5% (multi_seed.verdict). The bootstrap holds A - B, so B - A is its exact negation
    (written 0 - x, so that a zero prints as +0.000, not -0.000)."""
    lines = []
    for metric in ("macro_f1", "accuracy"):
        boot = numbers["bootstrap"][metric]
        b_minus_a = {metric: 0.0 - boot["difference"], "ci95": [0.0 - boot["ci95_high"], 0.0 - boot["ci95_low"]],
                     "mcnemar_p": numbers["mcnemar"]["p_value"]}
        lines.append(verdict(f"{names[1]} − {names[0]}", b_minus_a, metric=metric))
    return lines


def training_summary(log: list[dict]) -> dict:
    times = [r["epoch_time_s"] for r in log]
    return {"epochs": len(log), "mean_epoch_time_s": float(np.mean(times)),
            "mean_images_per_s": float(np.mean([r["images_per_s"] for r in log])),
            "first_loss": float(log[0]["loss"]), "final_loss": float(log[-1]["loss"])}


# ---------------------------------------------------------------------------- pictures


def pick_examples(correct_a: list[bool], correct_b: list[bool], names: tuple[str, str], per_category: int,
                  seed: int) -> dict[str, list[int]]:
    """Up to `per_category` row indices per agreement category, drawn without replacement with `seed`."""
    ca, cb = np.asarray(correct_a), np.asarray(correct_b)
    categories = {"both right": ca & cb, "both wrong": ~ca & ~cb,
                  f"only {names[0]} right": ca & ~cb, f"only {names[1]} right": ~ca & cb}
    rng = np.random.default_rng(seed)
    picks = {}
    for category, mask in categories.items():
        rows = np.flatnonzero(mask)
        chosen = rng.choice(rows, size=min(per_category, rows.size), replace=False) if rows.size else rows
        picks[category] = sorted(int(i) for i in chosen)
    return picks


def draw_pictures(a: RunResults, b: RunResults, names: tuple[str, str], numbers: dict, out_dir: Path,
                  per_category: int, seed: int) -> dict[str, list]:
    """Write every PNG; returns {section: [file names]}, examples as (file, category), for the markdown."""
    files: dict[str, list] = {"confusion": [], "calibration": [], "examples": []}
    for key, name in zip(("a", "b"), names):
        file = f"confusion_{_slug(name)}.png"
        plot_confusion(np.asarray(numbers["metrics"][key]["confusion_normalized"]), a.class_names,
                       f"Confusion matrix (normalized): {name}", out_dir / file)
        files["confusion"].append(file)
    logs = {name: run.log for name, run in zip(names, (a, b)) if run.log}
    if logs:
        plot_loss_curves({n: [r["loss"] for r in log] for n, log in logs.items()}, out_dir / "loss_curves.png")
        plot_epoch_times({n: training_summary(log)["mean_epoch_time_s"] for n, log in logs.items()},
                         out_dir / "epoch_times.png")
    if has_wise_ft_shift(a, b):
        plot_wise_ft({name: [(p["alpha"], p["accuracy"], p["shift"]["accuracy"]) for p in run.wise_ft]
                      for name, run in zip(names, (a, b))}, out_dir / "wise_ft.png")
    plot_reliability({name: numbers["reliability"][key] for key, name in zip(("a", "b"), names)},
                     out_dir / "reliability.png")
    files["calibration"] = ["reliability.png"]

    picks = pick_examples(numbers["correct"]["a"], numbers["correct"]["b"], names, per_category, seed)
    panels, singles = {}, []
    for category, rows in picks.items():
        panels[category] = []
        for row in rows:
            predictions = {names[0]: a.pred[row], names[1]: numbers["pred_b_aligned"][row]}
            panels[category].append(compare_panel(load_image(a.paths[row]), a.true[row], predictions))
        if panels[category]:  # the first of each category also gets its own picture
            singles.append((category, panels[category][0]))
    compare_grid(panels, out_dir / "compare_grid.png", f"{names[0]} vs {names[1]} on the same test images")
    for i, (category, panel) in enumerate(singles, start=1):
        panel.save(out_dir / f"compare_{i}.png", format="PNG")
        files["examples"].append((f"compare_{i}.png", category))
    return files


# ---------------------------------------------------------------------------- markdown


def _f(x: float) -> str:
    return f"{x:.3f}"


def _d(x: float) -> str:
    return f"{x:+.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _picture(file: str, caption: str) -> list[str]:
    return [f"![{caption}]({file})", "", f"*{caption}*", ""]


def class_gaps(numbers: dict, class_names: list[str]) -> list[tuple[str, float, float]]:
    """(class, recall A, recall B) sorted by |A - B|, largest first (ties keep class order)."""
    pa, pb = numbers["metrics"]["a"]["per_class"], numbers["metrics"]["b"]["per_class"]
    rows = [(c, pa[c]["recall"], pb[c]["recall"]) for c in class_names]
    return sorted(rows, key=lambda r: -abs(r[1] - r[2]))


def _ci_sentence(label: str, boot: dict) -> str:
    low, high = boot["ci95_low"], boot["ci95_high"]
    verdict = ("it excludes 0, so the gap is larger than what re-drawing the test images would produce"
               if low > 0 or high < 0 else f"it includes 0, so the {label} gap is within what re-drawing the "
               "test images would produce")
    return f"The 95% paired-bootstrap CI of the {label} difference is [{_d(low)}, {_d(high)}]: {verdict}."


def summary_paragraph(names: tuple[str, str], numbers: dict, class_names: list[str],
                      summaries: dict[str, dict]) -> str:
    """Plain-language reading of the numbers; every clause is a direct consequence of one of them."""
    a, b = names
    ma, mb = numbers["metrics"]["a"], numbers["metrics"]["b"]
    f1_gap = ma["macro_f1"] - mb["macro_f1"]
    leader = a if f1_gap > 0 else b if f1_gap < 0 else None
    lines = [f"On the same {numbers['num_images']} test images, "
             + (f"{leader} has the higher macro-F1" if leader else "the two models have the same macro-F1")
             + f" ({a} {_f(ma['macro_f1'])}, {b} {_f(mb['macro_f1'])}; A − B = {_d(f1_gap)}) and accuracy "
             f"{_f(ma['accuracy'])} vs {_f(mb['accuracy'])} (A − B = {_d(ma['accuracy'] - mb['accuracy'])})."]
    lines.append(_ci_sentence("macro-F1", numbers["bootstrap"]["macro_f1"]))
    lines.append(_ci_sentence("accuracy", numbers["bootstrap"]["accuracy"]))
    mc = numbers["mcnemar"]
    verdict = "rejects" if mc["p_value"] < 0.05 else "does not reject"
    lines.append(f"The models disagree on correctness for {mc['n_discordant']} images ({a} alone right on "
                 f"{mc['b']}, {b} alone right on {mc['c']}); the exact McNemar test {verdict} equal error "
                 f"rates at the 5% level (p = {mc['p_value']:.3g}).")
    gaps = class_gaps(numbers, class_names)
    ahead_a = sum(ra > rb for _, ra, rb in gaps)
    ahead_b = sum(rb > ra for _, ra, rb in gaps)
    support = min(ma["per_class"][c]["support"] for c in class_names)
    top = gaps[0]
    if ahead_a + ahead_b == 0:
        lines.append("Per class, the two models have the same accuracy on every class.")
    else:
        lines.append(f"Per class, {a} has the higher accuracy on {ahead_a} classes and {b} on {ahead_b} "
                     f"({len(gaps) - ahead_a - ahead_b} tied); the largest gap is {display_name(top[0])} "
                     f"({_d(top[1] - top[2])}). Per-class gaps are not tested one by one"
                     + (f": with {support} images in the smallest class, one image moves its accuracy by "
                        f"{1 / support:.3f}." if support else "."))
    ea, eb = numbers["ece"]["a"], numbers["ece"]["b"]
    lines.append(f"Expected calibration error is {_f(ea)} for {a} and {_f(eb)} for {b} (lower means "
                 "confidence closer to accuracy).")
    if len(summaries) == 2:
        ta, tb = (summaries[n]["mean_epoch_time_s"] for n in names)
        lines.append(f"Per epoch, {a} took {ta:.1f} s and {b} {tb:.1f} s on average.")
    lines.append("Each model is one training run: the intervals cover the choice of test images, "
                 "not training randomness (seeds, data order).")
    return " ".join(lines)


def has_wise_ft_shift(a: RunResults, b: RunResults) -> bool:
    """Both runs carry a WiSE-FT curve (wise_ft_curve.json) scored on the shifted test split too."""
    return bool(a.wise_ft and b.wise_ft and all("shift" in p for p in a.wise_ft + b.wise_ft))


def wise_ft_section(names: tuple[str, str], runs: tuple[RunResults, RunResults]) -> list[str]:
    """The weight-space mixes (1 - alpha) zero-shot + alpha fine-tuned (Wortsman et al. 2022) of each run,
    drawn as the WiSE-FT paper does (ID accuracy against shift accuracy), and their numbers."""
    rows = [[name, f"{p['alpha']:g}", _f(p["accuracy"]), _f(p["shift"]["accuracy"]), _f(p["macro_f1"]),
             _f(p["shift"]["macro_f1"]), _f(p["validation"]["macro_f1"]) if "validation" in p else "-"]
            for name, run in zip(names, runs) for p in run.wise_ft]
    return (["## WiSE-FT: from zero-shot to fine-tuned, in distribution and under shift", "",
             "Each run's weight-space mixes (1 − alpha)·zero-shot + alpha·fine-tuned at each alpha of its curve, scored on "
             "the test split (ID), the shifted test split and the run's validation part of train, where the "
             "alpha to use is chosen (never on test).", ""]
            + _picture("wise_ft.png", "WiSE-FT: ID test accuracy (x) against shifted test accuracy (y), one point "
                                      "per alpha, the zero-shot and fine-tuned ends labelled")
            + _table(["Model", "alpha", "ID acc.", "Shift acc.", "ID macro-F1", "Shift macro-F1",
                      "Validation macro-F1"], rows) + [""])


def memory_note(a: RunResults, b: RunResults) -> str:
    """Where the cross-batch memory joins: from then on each row is scored against B + M candidates,
    so a loss (a sum over candidates) jumps there without the model getting worse."""
    joins = {r.name: next((rec["epoch"] for rec in r.log if rec.get("memory_rows")), None) for r in (a, b) if r.log}
    joins = {name: epoch for name, epoch in joins.items() if epoch}
    if not joins:
        return ""
    where = ", ".join(f"{name} in epoch {epoch}" for name, epoch in joins.items())
    return (f" (the cross-batch memory joins {where}: from then on each row also scores the memory's rows, "
            "so the loss jumps there without the model getting worse)")


def write_markdown(path: Path, a: RunResults, b: RunResults, names: tuple[str, str], numbers: dict,
                   files: dict[str, list], per_category: int, lead: Sequence[str] = (),
                   looks: Sequence[str] = ()) -> None:
    classes = a.class_names
    ma, mb = numbers["metrics"]["a"], numbers["metrics"]["b"]
    summaries = {n: training_summary(r.log) for n, r in zip(names, (a, b)) if r.log}
    out = [f"# {names[0]} vs {names[1]}: human action recognition test set", ""]
    if a.synthetic or b.synthetic:
        out += ["> **SYNTHETIC DEMO — NOT A RESULT ABOUT CLIP OR SIGLIP.** These are tiny models trained "
                "on synthetic cartoon images (train_config.json has `\"synthetic\": true`). "
                "The numbers exercise the pipeline and say nothing about real CLIP or SigLIP.", ""]
    out += list(lead)
    out += ["## Where the numbers come from", ""]
    for key, name, run in (("A", names[0], a), ("B", names[1], b)):
        out.append(f"- **{key} = {name}** (family `{run.family}`): `{run.directory}`"
                   + (f", {run.skipped_images} unreadable test images skipped" if run.skipped_images else ""))
    out += [f"- **{numbers['num_images']} test images**, {len(classes)} classes; the two predictions.csv "
            "files were aligned by image path and hold exactly the same images.",
            f"- Every metric is recomputed here from predictions.csv. Every difference is A − B "
            f"({names[0]} − {names[1]}): positive means {names[0]} is higher.",
            f"- Paired bootstrap: {numbers['n_resamples']} resamples of the test images, seed {numbers['seed']}. "
            f"ECE: softmax of the logits in predictions.csv, {ECE_BINS} equal-width bins (Guo et al. 2017).", "",
            "## What this shows", "", summary_paragraph(names, numbers, classes, summaries), ""]

    if has_wise_ft_shift(a, b):
        out += wise_ft_section(names, (a, b))
    out += ["## Table 1: Overall metrics", ""]
    out += _table(["Model", "Macro precision", "Macro recall", "Macro F1", "Accuracy"],
                  [[n, _f(m["macro_precision"]), _f(m["macro_recall"]), _f(m["macro_f1"]), _f(m["accuracy"])]
                   for n, m in zip(names, (ma, mb))]) + [""]
    out += ["## Table 2: Per-class accuracy (recall per class)", ""]
    out += _table(["Class", f"{names[0]} acc.", f"{names[1]} acc.", f"Δ ({names[0]} − {names[1]})", "Support"],
                  [[display_name(c), _f(ma["per_class"][c]["recall"]), _f(mb["per_class"][c]["recall"]),
                    _d(ma["per_class"][c]["recall"] - mb["per_class"][c]["recall"]),
                    str(ma["per_class"][c]["support"])] for c in classes]) + [""]
    out += ["## Per-class F1", ""]
    out += _table(["Class", f"{names[0]} F1", f"{names[1]} F1", f"Δ F1 ({names[0]} − {names[1]})"],
                  [[display_name(c), _f(ma["per_class"][c]["f1"]), _f(mb["per_class"][c]["f1"]),
                    _d(ma["per_class"][c]["f1"] - mb["per_class"][c]["f1"])] for c in classes]) + [""]

    out += ["## Where each model wins (per-class accuracy, largest gap first)", ""]
    gaps = class_gaps(numbers, classes)
    for mine, theirs, name in ((ma["per_class"], mb["per_class"], names[0]), (mb["per_class"], ma["per_class"], names[1])):
        wins = [c for c, _, _ in gaps if mine[c]["recall"] > theirs[c]["recall"]]
        out += [f"**{name} ahead** on {len(wins) or 'no'} class{'' if len(wins) == 1 else 'es'}"
                + (":" if wins else "."), ""]
        out += [f"- {display_name(c)}: accuracy {_f(mine[c]['recall'])} vs {_f(theirs[c]['recall'])} "
                f"(+{mine[c]['recall'] - theirs[c]['recall']:.3f} for {name}); "
                f"F1 {_f(mine[c]['f1'])} vs {_f(theirs[c]['f1'])}" for c in wins]
        out += [""] if wins else []
    ties = [display_name(c) for c, ra, rb in gaps if ra == rb]
    out += [f"**Tied:** {', '.join(ties) if ties else 'none'}.", ""]

    bs, mc = numbers["bootstrap"], numbers["mcnemar"]
    out += ["## Is the difference real? (paired tests on the same images)", ""]
    out += _table(["Difference (A − B)", "Observed", "95% CI (paired bootstrap)", "CI excludes 0",
                   "Resamples with A − B ≤ 0"],
                  [[label, _d(bs[k]["difference"]), f"[{_d(bs[k]['ci95_low'])}, {_d(bs[k]['ci95_high'])}]",
                    "yes" if bs[k]["ci95_low"] > 0 or bs[k]["ci95_high"] < 0 else "no",
                    f"{bs[k]['fraction_difference_le_0']:.3f}"]
                   for label, k in (("Macro F1", "macro_f1"), ("Accuracy", "accuracy"))]) + [""]
    out += ["The last column is a one-sided bootstrap p-value for \"A is better\": the share of resamples in "
            "which A does not beat B (near 1 when B is better).", ""]
    out += [f"Exact McNemar test: {names[0]} right and {names[1]} wrong on {mc['b']} images, "
            f"{names[0]} wrong and {names[1]} right on {mc['c']}; p = {mc['p_value']:.4g}.", ""]

    out += ["## Calibration", ""]
    out += _table(["Model", f"ECE ({ECE_BINS} bins)"], [[n, _f(numbers["ece"][k])] for n, k in zip(names, "ab")])
    out += [""] + _picture(files["calibration"][0], "Reliability diagram: accuracy vs confidence per bin")

    out += ["## Confusion matrices", ""]
    for file, name in zip(files["confusion"], names):
        out += _picture(file, f"Confusion matrix (row-normalized): {name}")

    out += ["## Training dynamics", ""]
    missing = [n for n, r in zip(names, (a, b)) if not r.log]
    if missing:
        out += [f"No log.jsonl in the run of {' and '.join(missing)} (e.g. a zero-shot `evaluate` output): "
                "no training dynamics for it.", ""]
    if summaries:
        out += _table(["Model", "Epochs", "Mean s / epoch", "Mean images / s", "First loss", "Final loss"],
                      [[n, str(s["epochs"]), f"{s['mean_epoch_time_s']:.1f}", f"{s['mean_images_per_s']:.1f}",
                        f"{s['first_loss']:.4f}", f"{s['final_loss']:.4f}"] for n, s in summaries.items()]) + [""]
        if a.family != b.family and len(summaries) == 2:
            out += ["The two losses are different objectives (CLIP: softmax InfoNCE, SigLIP: pairwise "
                    "sigmoid), so their levels are not comparable; compare the shapes of the curves.", ""]
        out += _picture("loss_curves.png", "Training loss per epoch" + memory_note(a, b))
        out += _picture("epoch_times.png", "Average wall-clock time per epoch (lower is faster)")

    out += ["## Same images, both models", "",
            f"Ground truth in black; a prediction in green when correct, red when wrong. Up to {per_category} "
            f"images per category, drawn at random with seed {numbers['seed']}.", ""]
    out += _picture("compare_grid.png", "Both right / both wrong / only one model right")
    for file, category in files["examples"]:
        out += _picture(file, f"One test image: {category}")
    out += list(looks)

    out += ["## Verdict", "",
            "B − A per metric, its 95% paired-bootstrap CI, and the exact McNemar p; significant when the CI "
            "excludes 0 and McNemar rejects at 5%. These cover the choice of test images, not training randomness.",
            ""] + [f"- {line}" for line in verdict_lines(names, numbers)]
    path.write_text("\n".join(out).rstrip() + "\n", encoding="utf-8")


def compare_runs(run_a: str | Path, run_b: str | Path, out_dir: str | Path, n_resamples: int = 10_000,
                 seed: int = 0, examples_per_category: int = 4, lead: Sequence[str] = (),
                 explain: ExplainInputs | None = None) -> Path:
    """Write OUT_DIR/report.md, comparison.json and the PNGs it links; returns the report's path.
    `lead`: markdown lines placed before the two runs' tables (the demo's multi-seed summary).
    `explain`: the data directory and zero-shot checkpoints for the section "What each model looks at"
    (report_maps.py; it also writes pointing_game.json); without it the report has no such section."""
    a, b = load_run(run_a), load_run(run_b)
    names = _model_names(a, b)
    numbers = comparison_numbers(a, b, n_resamples, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = draw_pictures(a, b, names, numbers, out_dir, examples_per_category, seed)
    looks = explain_section(a, b, names, numbers, explain, out_dir, seed) if explain else []
    report = out_dir / "report.md"
    write_markdown(report, a, b, names, numbers, files, examples_per_category, lead, looks)
    saved = {k: v for k, v in numbers.items() if k not in ("correct", "pred_b_aligned")}
    saved.update(models={"a": names[0], "b": names[1]}, runs={"a": str(a.directory), "b": str(b.directory)},
                 verdict=verdict_lines(names, numbers))
    (out_dir / "comparison.json").write_text(json.dumps(saved, indent=2) + "\n")
    return report
