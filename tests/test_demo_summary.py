"""The demo's result as data: summary.json's schema and what its numbers must equal.

Each family's path (demo.py::run_family) runs in-process on a small world with 0-epoch fine-tunes, so
every fine-tuned seed is the pretrained checkpoint scored as a run: it must equal zero-shot exactly,
the seeds must agree, and the WiSE-FT mix of two identical endpoints must too. summary.py then reads the
run directories back; every number it writes is checked against the run's own metrics files.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from har_ref.demo import demo
from har_ref.demo.summary import ROWS, markdown, summarize
from har_ref.demo.synthetic import generate

pytestmark = pytest.mark.usefixtures("one_thread")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    generate(out / "data", train_per_class=5, test_per_class=4, seed=5)
    patch = pytest.MonkeyPatch()
    config = demo.fine_tune_config
    patch.setattr(demo, "fine_tune_config", lambda family, seed: replace(config(family, seed), epochs=0))
    for family in ("clip", "siglip"):
        demo.run_family(family, out / "data", out, SEEDS)
    patch.undo()
    return out


def test_summary_has_the_documented_schema_and_the_runs_numbers(demo_out):
    summary = summarize(demo_out, SEEDS, wall_seconds=12.5, precision="fp32")
    assert set(summary) == {"families", "siglip_minus_clip", "wall_seconds", "precision", "cpu", "test_images"}
    assert summary["test_images"] == {"id": 15 * 4, "shift": 15 * 4} and summary["precision"] == "fp32"
    for family, rows in summary["families"].items():
        assert list(rows) == [key for key, _ in ROWS]
        for key, entry in rows.items():
            for split, suffix in (("id", ""), ("shift", "_shift")):
                e = entry[split]
                assert e["ci95"][0] <= e["macro_f1"] <= e["ci95"][1]
                runs = ([demo_out / family / f"seed{s}" for s in SEEDS] if key == "fine_tuned" else
                        [demo_out / {"zero_shot": "zero_shot", "linear_probe": "linear_probe",
                                     "wise_ft_best": "wise_ft"}[key] / family])
                own = [json.loads((r / f"metrics{suffix}.json").read_text()) for r in runs]
                assert e["macro_f1"] == pytest.approx(sum(m["macro_f1"] for m in own) / len(own), abs=1e-12)
                assert e["accuracy"] == pytest.approx(sum(m["accuracy"] for m in own) / len(own), abs=1e-12)
        tuned, zero = rows["fine_tuned"], rows["zero_shot"]
        assert tuned["seeds"] == tuned["id"]["seeds_macro_f1"] and len(tuned["seeds"]) == len(SEEDS)
        # 0 epochs: every seed is the checkpoint, scored in the same precision as zero-shot
        assert tuned["seeds"] == [zero["id"]["macro_f1"]] * len(SEEDS) and tuned["id"]["sd_macro_f1"] == 0
        assert tuned["shift"]["macro_f1"] == zero["shift"]["macro_f1"]
        assert rows["wise_ft_best"]["alpha"] in [round(0.1 * i, 1) for i in range(11)]
        assert rows["wise_ft_best"]["id"]["macro_f1"] == zero["id"]["macro_f1"]  # both ends are the checkpoint
    for split in ("id", "shift"):
        d = summary["siglip_minus_clip"]["fine_tuned"][split]
        assert set(d) == {"macro_f1", "ci95", "mcnemar_p"} and 0 <= d["mcnemar_p"] <= 1
        expected = (summary["families"]["siglip"]["fine_tuned"][split]["macro_f1"]
                    - summary["families"]["clip"]["fine_tuned"][split]["macro_f1"])
        assert d["macro_f1"] == pytest.approx(expected, abs=1e-12)
    text = "\n".join(markdown(summary, SEEDS))
    assert text.count("SigLIP − CLIP macro-F1 = ") == 2 and "seeds 0, 1" in text


def test_the_run_of_each_seed_holds_out_the_same_validation_part(demo_out):
    first = (demo_out / "clip" / "seed0" / "validation.csv").read_bytes()
    assert first and (demo_out / "clip" / "seed1" / "validation.csv").read_bytes() == first
    curve = json.loads((demo_out / "clip" / "seed0" / "wise_ft_curve.json").read_text())["curve"]
    assert all({"validation", "shift"} <= set(point) for point in curve)
