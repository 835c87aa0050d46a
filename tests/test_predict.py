"""`python -m har_ref predict` on tiny checkpoints and synthetic images.

The probabilities are checked against logits computed independently with evaluation's
scoring (embed.py: class_embeddings + image_scores), so predict cannot drift from evaluation; the
label space of a fine-tuned run directory comes from a real (one-epoch) training run.
Most runs call the CLI's main() in-process (fast on two cores); the subprocess runs prove
the real entry point: `--json -` leaves JSON alone on stdout, errors are one line.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from har_ref import load_model, load_tokenizer
from har_ref.__main__ import main
from har_ref.data.prompts import PromptBank
from har_ref.eval.embed import class_embeddings, image_scores
from har_ref.eval.predict import fmt
from har_ref.demo.synthetic import CLASS_NAMES, generate
from har_ref.train.loop import train
from har_ref.train.config import TrainConfig
from har_ref.model.transforms import build_transform, load_image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate(root, train_per_class=2, test_per_class=2, image_size=32, seed=0)
    return root


@pytest.fixture(scope="module")
def weights(tiny_weights):
    return tiny_weights


def predict(capsys, *args) -> tuple[int, str, str]:
    code = main(["predict", *map(str, args)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def reference(weights, paths, class_names, prompts=None) -> dict[str, dict[str, float]]:
    """path -> {class: probability} from evaluate.py's scoring, all images in one batch."""
    model, tokenizer = load_model(weights), load_tokenizer(weights)
    transform = build_transform(model.cfg, train=False)
    batch = (torch.stack([transform(load_image(p)) for p in paths]), torch.zeros(len(paths)), torch.arange(len(paths)))
    class_emb = class_embeddings(model, tokenizer, PromptBank.from_file(prompts, class_names), class_names)
    logits = torch.from_numpy(image_scores(model, [batch], class_emb)[0])
    probs = logits.softmax(-1) if model.cfg.family == "clip" else logits.sigmoid()
    return {str(p): dict(zip(class_names, row.tolist())) for p, row in zip(paths, probs)}


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_probabilities_are_softmax_or_sigmoid_of_the_evaluation_logits(family, data, weights, tmp_path, capsys):
    """A folder, in batches of 7 (30 images: a ragged last batch), against one batch of 30."""
    code, out, _ = predict(capsys, "--weights", weights[family], data / "test", "--top-k", 15, "--batch-size", 7,
                           "--json", tmp_path / "p.jsonl")
    assert code == 0
    records = read_jsonl(tmp_path / "p.jsonl")
    paths = sorted((data / "test").rglob("*.png"))
    assert [r["path"] for r in records] == [str(p) for p in paths]  # the folder, recursively, sorted
    expected = reference(weights[family], paths, list(CLASS_NAMES))
    kind = "softmax" if family == "clip" else "sigmoid"
    assert kind in out.splitlines()[0]
    for r in records:
        assert (r["family"], r["probability"]) == (family, kind)
        got = {t["class"]: t["probability"] for t in r["top_k"]}
        assert sorted(got) == sorted(CLASS_NAMES)
        assert list(got.values()) == sorted(got.values(), reverse=True)
        assert max(abs(got[c] - expected[r["path"]][c]) for c in CLASS_NAMES) <= 1e-6
    sums = [sum(t["probability"] for t in r["top_k"]) for r in records]
    if family == "clip":
        assert all(abs(s - 1) < 1e-5 for s in sums)
    else:  # independent sigmoids of a random tiny SigLIP (bias -10): nowhere near summing to 1
        assert all(s < 0.5 for s in sums)


IMAGE_LINE = re.compile(r"^  (/\S+): (.*)$")  # the tests pass absolute paths


def test_text_and_json_say_the_same(data, weights, tmp_path, capsys):
    images = sorted((data / "test" / "texting").iterdir())
    code, out, _ = predict(capsys, "--weights", weights["clip"], "--weights", weights["siglip"], *images,
                           "--json", tmp_path / "p.jsonl")
    assert code == 0
    records, lines = read_jsonl(tmp_path / "p.jsonl"), out.splitlines()
    assert lines[0].startswith("CLIP [") and "softmax" in lines[0]
    assert lines[1] == "  classes: the 15 default HAR classes (--classes to change); prompts: the packaged " \
                       "har_ref/prompts.json"
    assert lines[4].startswith("SigLIP [") and "per-class sigmoid" in lines[4] and "need not sum to 1" in lines[4]
    printed = [IMAGE_LINE.match(line).groups() for line in lines if IMAGE_LINE.match(line)]
    assert len(printed) == len(records) == 4 and lines[-1] == f"wrote {tmp_path / 'p.jsonl'}"
    for (path, ranked), r in zip(printed, records):
        assert path == r["path"]
        assert ranked == ", ".join(f"{t['class']} {fmt(t['probability'])}" for t in r["top_k"])
    assert [r["model"] for r in records] == ["CLIP", "CLIP", "SigLIP", "SigLIP"]


def test_json_dash_prints_only_json(data, weights, tmp_path):
    folder = data / "test" / "texting"
    done = subprocess.run([sys.executable, "-m", "har_ref", "predict", "--weights", str(weights["siglip"]),
                           str(folder), "--json", "-", "--top-k", "15"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == ""
    records = [json.loads(line) for line in done.stdout.splitlines()]
    expected = reference(weights["siglip"], sorted(folder.iterdir()), list(CLASS_NAMES))
    assert [r["path"] for r in records] == list(expected)
    for r in records:
        assert all(abs(t["probability"] - expected[r["path"]][t["class"]]) <= 1e-6 for t in r["top_k"])


def test_panel_with_two_models(data, weights, tmp_path, capsys):
    image = sorted((data / "test" / "texting").iterdir())[0]
    code, out, _ = predict(capsys, "--weights", weights["clip"], "--weights", weights["siglip"], image,
                           "--true", "texting", "--panel", tmp_path / "panel.png")
    assert code == 0 and (tmp_path / "panel.png").is_file() and out.splitlines()[-1] == f"wrote {tmp_path / 'panel.png'}"
    code, _, err = predict(capsys, "--weights", weights["clip"], image.parent, "--true", "texting",
                           "--panel", tmp_path / "two.png")  # a folder of two images
    assert code == 2 and "--panel draws one image" in err and not (tmp_path / "two.png").exists()


def test_folders_are_walked_and_bad_images_skipped(data, weights, tmp_path, capsys):
    good = sorted((data / "test" / "running").iterdir())
    folder = tmp_path / "photos"
    (folder / "nested" / "deeper").mkdir(parents=True)
    (folder / ".cache").mkdir()
    shutil.copy(good[0], folder / "b.png")
    shutil.copy(good[1], folder / "nested" / "deeper" / "a.PNG")
    shutil.copy(good[0], folder / ".hidden.png")
    shutil.copy(good[0], folder / ".cache" / "c.png")
    (folder / "notes.txt").write_text("not an image, not an image extension")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "nested" / "text.jpg").write_text("hello, I am not a JPEG")
    code, out, err = predict(capsys, "--weights", weights["clip"], "--weights", weights["siglip"], folder,
                             "--json", tmp_path / "p.jsonl")
    assert code == 0
    assert [r["path"] for r in read_jsonl(tmp_path / "p.jsonl")] == 2 * [
        str(folder / "b.png"), str(folder / "nested" / "deeper" / "a.PNG")]
    skipped = err.splitlines()
    assert len(skipped) == 2  # once each, though two models met them
    assert skipped[0] == f"skipped {folder / 'empty.jpg'}: empty file (0 bytes)"
    assert skipped[1].startswith(f"skipped {folder / 'nested' / 'text.jpg'}: UnidentifiedImageError")


def test_a_run_directory_brings_its_classes_and_prompts(data, weights, tmp_path, capsys):
    """One epoch of real training on 3 renamed classes with a generic-only template bank: the run's
    classes.json and prompts.json (the default bank would reject these class names) drive predict."""
    renamed = {"calling": "wave", "running": "sit", "texting": "jump"}
    for split in ("train", "test"):
        for src, dst in renamed.items():
            shutil.copytree(data / split / src, tmp_path / "data" / split / dst)
    (tmp_path / "bank.json").write_text(json.dumps({"templates": ["a picture of someone who is {}."]}))
    cfg = TrainConfig(model="siglip", epochs=1, micro_batch=2, accum_steps=1, xbm_size=0, lr=1e-3, warmup_steps=1,
                      precision="fp32", workers=0, eval_batch=16, prompts=str(tmp_path / "bank.json"))
    run = tmp_path / "run"
    train(cfg, weights["siglip"], tmp_path / "data", run)
    capsys.readouterr()
    assert json.loads((run / "classes.json").read_text()) == ["jump", "sit", "wave"]

    images = sorted((tmp_path / "data" / "test").rglob("*.png"))
    code, out, _ = predict(capsys, "--weights", run, tmp_path / "data" / "test", "--top-k", 5,
                           "--json", tmp_path / "p.jsonl")
    assert code == 0
    assert out.splitlines()[1] == f"  classes: {run / 'classes.json'} (3); prompts: {run / 'prompts.json'}"
    expected = reference(run, images, ["jump", "sit", "wave"], run / "prompts.json")
    records = read_jsonl(tmp_path / "p.jsonl")
    assert len(records) == 6
    for r in records:
        got = {t["class"]: t["probability"] for t in r["top_k"]}
        assert sorted(got) == ["jump", "sit", "wave"]  # --top-k 5 of 3 classes: all 3
        assert max(abs(got[c] - expected[r["path"]][c]) for c in got) <= 1e-6

    code, out, _ = predict(capsys, "--weights", run, images[0], "--classes", "sit,jump", "--json", "-")
    record = json.loads(out)
    assert code == 0 and [t["class"] for t in record["top_k"]] in (["sit", "jump"], ["jump", "sit"])
    assert record["source"] == f"classes: --classes (2); prompts: {run / 'prompts.json'}"


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist; pass existing image files or folders."),
    ("no_images", "holds no image files"),
    ("top_k", "--top-k must be at least 1, got 0."),
    ("all_bad", "none of the 2 image(s) could be decoded"),
    ("no_weights", "config.json not found"),
])
def test_user_errors_exit_2_with_one_line(case, message, weights, tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("no images here")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not a PNG")
    image = tmp_path / "text.png"
    args = {"missing": [weights["clip"], tmp_path / "nope.jpg"], "no_images": [weights["clip"], tmp_path / "docs"],
            "top_k": [weights["clip"], image, "--top-k", 0], "all_bad": [weights["clip"], tmp_path / "empty.jpg", image],
            "no_weights": [tmp_path / "no_weights", tmp_path / "empty.jpg"]}[case]
    code, out, err = predict(capsys, "--weights", *args)
    lines = err.splitlines()
    assert code == 2 and message in lines[-1] and lines[-1].startswith("error: ")
    assert len(lines) == (3 if case == "all_bad" else 1)  # all_bad: one 'skipped' line per image first
    assert "CLIP" not in out


def test_the_real_entry_point_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "har_ref", "predict", "--weights", str(tmp_path),
                           str(tmp_path / "nope.jpg")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"error: {tmp_path / 'nope.jpg'} does not exist; pass existing image files or folders.\n"
