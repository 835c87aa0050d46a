"""The demo's result as data and as the report's first section: summary.json and the miniature study table.

Per family: zero-shot, linear probe, fine-tuned (the mean over seeds) and the best WiSE-FT mix (alpha
chosen on the fine-tuned run's validation part of train, never on test), each on the test split (ID)
and the shifted test split (shift), macro-F1 with its 95% bootstrap CI (eval/multi_seed.py); then
SigLIP - CLIP after fine-tuning with its CI and the pooled McNemar p, and one verdict line per split.

summary.json:
    {"families": {"clip": {"zero_shot": E, "linear_probe": E, "fine_tuned": E, "wise_ft_best": E}, "siglip": ...},
     "siglip_minus_clip": {"fine_tuned": {"id": D, "shift": D}},
     "wall_seconds": s, "precision": "fp32" | "bf16", "cpu": "...", "test_images": {"id": n, "shift": n}}
    E = {"id": {"macro_f1", "accuracy", "ci95"}, "shift": {...}}; fine_tuned adds "seeds" (each seed's ID
    macro-F1) and, per split, "seeds_macro_f1" and "sd_macro_f1"; wise_ft_best adds "alpha".
    D = {"macro_f1": siglip - clip, "ci95": [lo, hi], "mcnemar_p": p}
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

from ..eval.multi_seed import difference, score, verdict
from ..model.config import MODEL_NAMES

SPLITS = {"id": "", "shift": "_shift"}  # summary key -> the run directory's file suffix
ROWS = (("zero_shot", "Zero-shot"), ("linear_probe", "Linear probe"), ("fine_tuned", "Fine-tuned"),
        ("wise_ft_best", "Best WiSE-FT"))


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def family_runs(out: Path, family: str, seeds) -> dict[str, list[Path]]:
    """The run directories behind each row, as the demo lays them out under OUT."""
    return {"zero_shot": [out / "zero_shot" / family], "linear_probe": [out / "linear_probe" / family],
            "fine_tuned": [out / family / f"seed{s}" for s in seeds], "wise_ft_best": [out / "wise_ft" / family]}


def summarize(out: Path, seeds, wall_seconds: float, precision: str) -> dict:
    """summary.json's dict from the demo's run directories under OUT."""
    families, n_images = {}, {}
    for family in MODEL_NAMES:
        rows = {}
        for row, runs in family_runs(out, family, seeds).items():
            entry = {}
            for split, suffix in SPLITS.items():
                s = score(runs, suffix)
                entry[split] = {"macro_f1": s["macro_f1"], "accuracy": s["accuracy"], "ci95": s["ci95"]}
                if row == "fine_tuned":
                    entry[split].update(seeds_macro_f1=s["seeds_macro_f1"], sd_macro_f1=s["sd_macro_f1"])
                n_images[split] = _count_rows(runs[0] / f"predictions{suffix}.csv")
            if row == "fine_tuned":
                entry["seeds"] = entry["id"]["seeds_macro_f1"]
            if row == "wise_ft_best":
                entry["alpha"] = json.loads((runs[0] / "wise_ft.json").read_text())["alpha"]
            rows[row] = entry
        families[family] = rows
    tuned = {f: family_runs(out, f, seeds)["fine_tuned"] for f in MODEL_NAMES}
    gap = {split: {k: v for k, v in difference(tuned["clip"], tuned["siglip"], suffix).items() if k != "accuracy"}
           for split, suffix in SPLITS.items()}
    return {"families": families, "siglip_minus_clip": {"fine_tuned": gap}, "wall_seconds": round(wall_seconds, 1),
            "precision": precision, "cpu": cpu_name(), "test_images": n_images}


def _count_rows(predictions_csv: Path) -> int:
    return sum(1 for _ in predictions_csv.open(encoding="utf-8")) - 1


def markdown(summary: dict, seeds) -> list[str]:
    """The report's first section: the miniature study's table, the verdict lines and the WiSE-FT picture."""
    n = summary["test_images"]
    lines = ["## The miniature study: zero-shot, linear probe, fine-tuned, WiSE-FT (ID and shift)", "",
             f"Macro-F1 with its 95% bootstrap CI over the test images ({n['id']} ID, {n['shift']} shift). "
             f"Fine-tuned: the mean over seeds {', '.join(map(str, seeds))} (each seed's value and the sd over "
             "seeds beside it; one draw of test images scores every seed). Best WiSE-FT: seed 0's weight-space mix "
             "at the alpha with the highest macro-F1 on the validation part of train (never chosen on test). "
             f"Every number scored in {summary['precision']} on {summary['cpu']}.", "",
             "| Family | Row | ID macro-F1 [95% CI] | Shift macro-F1 [95% CI] | ID accuracy | Shift accuracy |",
             "|---|---|---|---|---|---|"]
    for family, rows in summary["families"].items():
        for key, label in ROWS:
            e = rows[key]
            extra = (f" (alpha {e['alpha']:g})" if key == "wise_ft_best" else
                     f" (seeds: {', '.join(f'{v:.3f}' for v in e['seeds'])}; sd {e['id']['sd_macro_f1']:.3f})"
                     if key == "fine_tuned" else "")
            lines.append(f"| {MODEL_NAMES[family]} | {label}{extra} | {_with_ci(e['id'])} | {_with_ci(e['shift'])} "
                         f"| {e['id']['accuracy']:.3f} | {e['shift']['accuracy']:.3f} |")
    lines += ["", "**SigLIP − CLIP after fine-tuning** (paired bootstrap with the same draw for every seed pair; "
              "exact McNemar on the discordant images pooled over seed pairs k against k):", ""]
    for split, label in (("id", "ID"), ("shift", "shift")):
        d = summary["siglip_minus_clip"]["fine_tuned"][split]
        lines.append(f"- {label}: " + verdict("SigLIP − CLIP", d))
    lines += ["", "The WiSE-FT section below draws seed 0's whole curve, in distribution against under shift.", ""]
    return lines


def _with_ci(e: dict) -> str:
    return f"{e['macro_f1']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]"
