"""data/: prompt bank validation, folder splits, bad-image handling, seeded loaders, split preparation."""
import csv
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import har_ref.data.folders as folders
from flat_layout import write_flat_csv_layout
from har_ref.data.folders import ImageFolderDataset, build_splits, make_eval_loader, make_train_loader
from har_ref.data.prompts import DEFAULT_PROMPTS, PromptBank, PromptSampler, class_phrase
from har_ref.data.prepare import prepare_splits
from har_ref.demo.synthetic import CLASS_NAMES


def write_png(path: Path, value: int = 0, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, 255 - value, 7)).save(path)
    return path


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, np.float32)).permute(2, 0, 1) / 255


# ---------------------------------------------------------------- prompt bank

def write_prompts(tmp_path: Path, spec) -> Path:
    path = tmp_path / "prompts.json"
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return path


def test_packaged_prompt_bank():
    bank = PromptBank.from_file(None, list(CLASS_NAMES))
    assert class_phrase("listening_to_music") == "listening to music"
    assert "a photo of a person listening to music." in bank.templates_for("listening_to_music")
    assert "a photo of a person using laptop." in bank.templates_for("using_laptop")
    spec = json.loads(DEFAULT_PROMPTS.read_text())
    assert len(spec["templates"]) >= 6
    texts, class_ids = bank.all_prompts()
    for class_id, name in enumerate(CLASS_NAMES):
        prompts = bank.templates_for(name)
        assert len(prompts) == len(spec["templates"]) + len(spec["class_templates"].get(name, []))
        assert [t for t, c in zip(texts, class_ids) if c == class_id] == prompts
        assert all("{" not in p and "_" not in p for p in prompts)
    assert "a photo of a person texting on a phone." in bank.templates_for("texting")
    # one template per example, a function of (seed, epoch, index): same draw whatever the batch
    sampler = PromptSampler(bank, list(CLASS_NAMES), lambda texts: (torch.arange(len(texts))[:, None], None),
                            torch.device("cpu"), seed=5)
    labels, indices = torch.zeros(500, dtype=torch.long), torch.arange(500)
    picks = sampler.pick(labels, indices, epoch=0, dataset_size=500)
    assert sampler.pick(labels[7:9], indices[7:9], epoch=0, dataset_size=500) == picks[7:9]
    assert set(picks) == set(range(len(bank.templates_for("calling"))))  # every template gets drawn
    assert sampler.pick(labels, indices, epoch=1, dataset_size=500) != picks


def test_replace_templates_stand_alone(tmp_path):
    path = write_prompts(tmp_path, {"templates": ["a photo of a person {}."],
                                    "class_templates": {"b_c": ["extra {}."]},
                                    "replace_templates": {"a": ["only this for {}.", "and this."]}})
    bank = PromptBank.from_file(path, ["a", "b_c"])
    assert bank.templates_for("a") == ["only this for a.", "and this."]
    assert bank.templates_for("b_c") == ["a photo of a person b c.", "extra b c."]
    assert bank.all_prompts() == (["only this for a.", "and this.", "a photo of a person b c.", "extra b c."],
                                  [0, 0, 1, 1])


@pytest.mark.parametrize("spec, message", [
    ({"templates": ["a photo of a person."]}, "must contain exactly one {}"),
    ({"templates": ["a {} photo of {}."]}, "must contain exactly one {}"),
    ({"templates": ["a photo of {0}."]}, "no other braces"),
    ({"templates": []}, "non-empty list of strings"),
    ({"templates": ["{}"], "class_templates": {"runing": ["x"]}}, "unknown class 'runing'"),
    ({"templates": ["{}"], "replace_templates": {"a": ["{} and {}"]}}, "at most one {}"),
    ({"templates": ["{}"], "class_template": {}}, "unknown keys ['class_template']"),
    ({"template": ["{}"]}, "must be a JSON object with a 'templates' list"),
    ("{not json", "is not valid JSON"),
])
def test_prompt_file_errors_name_file_and_key(tmp_path, spec, message):
    path = write_prompts(tmp_path, spec)
    with pytest.raises(ValueError) as error:
        PromptBank.from_file(path, ["a", "b"])
    assert message in str(error.value) and str(path) in str(error.value)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        PromptBank.from_file(tmp_path / "nope.json", ["a"])


# ---------------------------------------------------------------- folder splits

def test_build_splits_sorted_by_extension(tmp_path):
    for split in ("train", "test"):
        for name in ("b.PNG", "a.jpg", "c.JpEg", "d.webp", "e.bmp"):
            write_png(tmp_path / split / "zeta" / name)
        write_png(tmp_path / split / "alpha" / "x.png")
        (tmp_path / split / "alpha" / "notes.txt").write_text("not an image")
        (tmp_path / split / "alpha" / ".hidden.png").write_text("ignored")
    train, test, classes = build_splits(tmp_path)
    assert classes == ["alpha", "zeta"]
    assert [(Path(p).name, c) for p, c in train] == [("x.png", 0), ("a.jpg", 1), ("b.PNG", 1), ("c.JpEg", 1),
                                                     ("d.webp", 1), ("e.bmp", 1)]
    assert len(test) == len(train)


def test_class_mismatch_names_the_difference(tmp_path):
    for split, names in (("train", ["a", "b", "c"]), ("test", ["a", "d"])):
        for name in names:
            write_png(tmp_path / split / name / "1.png")
    with pytest.raises(ValueError) as error:
        build_splits(tmp_path)
    assert "missing from test: ['b', 'c']" in str(error.value)
    assert "missing from train: ['d']" in str(error.value)


def test_missing_and_empty_dirs(tmp_path):
    write_png(tmp_path / "train" / "a" / "1.png")
    with pytest.raises(FileNotFoundError, match="test"):
        build_splits(tmp_path)
    (tmp_path / "test" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"test/a has no image files"):
        build_splits(tmp_path)
    (tmp_path / "test" / "a").rmdir()
    with pytest.raises(ValueError, match="has no class folders"):
        build_splits(tmp_path)


# ---------------------------------------------------------------- bad images

def test_bad_images_are_skipped_and_reported(tmp_path):
    good = write_png(tmp_path / "good.png")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:3000])
    text = tmp_path / "text.jpg"
    text.write_text("this is not a JPEG")
    dangling = tmp_path / "dangling.png"
    os.symlink(tmp_path / "gone.png", dangling)
    items = [(str(good), 0), (str(truncated), 1), (str(tmp_path / "full.jpg"), 2), (str(text), 3), (str(dangling), 4)]
    dataset = ImageFolderDataset(items, to_tensor)
    assert dataset.items == [(str(good), 0), (str(tmp_path / "full.jpg"), 2)]
    assert [p for p, _ in dataset.skipped] == [str(truncated), str(text), str(dangling)]
    assert "truncated" in dataset.skipped[0][1] and "cannot identify" in dataset.skipped[1][1]
    pixels, class_id, index = dataset[1]
    assert pixels.shape == (3, 64, 64) and class_id == 2 and index == 1
    # A file that breaks after the check fails loudly, naming itself, instead of being replaced.
    good.write_text("corrupted later")
    with pytest.raises(ValueError, match="good.png"):
        dataset[0]
    with pytest.raises(ValueError, match="None of the 1 images"):
        ImageFolderDataset([(str(text), 0)], to_tensor)


# ---------------------------------------------------------------- loaders

class NoisyTransform:
    """Augmentation drawing from torch, numpy and random: reproducible only if all three are seeded."""

    def __call__(self, image):
        return to_tensor(image)[0, 0, 0] + torch.rand(()) + float(np.random.rand()) + random.random()


@pytest.fixture(scope="module")
def ten_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("ten")
    return [(str(write_png(root / f"{i}.png", value=20 * i)), i % 3) for i in range(10)]


def epochs(loader, n=2):
    out = []
    for epoch in range(n):
        loader.sampler.set_epoch(epoch)
        out.append([(x.tolist(), y.tolist(), i.tolist()) for x, y, i in loader])
    return out


def test_train_loader_reproducible_with_workers(ten_images):
    dataset = ImageFolderDataset(ten_images, NoisyTransform())
    np.random.seed(0), random.seed(0)  # the workers inherit these states: the loader must reseed them
    a = epochs(make_train_loader(dataset, batch_size=4, workers=2, seed=3))
    np.random.seed(1), random.seed(1)
    b = epochs(make_train_loader(dataset, batch_size=4, workers=2, seed=3))
    c = epochs(make_train_loader(dataset, batch_size=4, workers=2, seed=4))
    assert a == b  # same order AND same augmentation draws
    assert a != c
    for epoch in a:
        assert [len(idx) for _, _, idx in epoch] == [4, 4]  # drop_last: the 2 leftover items are dropped
        flat = [i for _, _, idx in epoch for i in idx]
        assert len(set(flat)) == 8
        assert all(y == [ten_images[i][1] for i in idx] for _, y, idx in epoch)
    assert [idx for _, _, idx in a[0]] != [idx for _, _, idx in a[1]]  # set_epoch reshuffles


def test_train_loader_order_depends_on_seed_and_epoch_only(ten_images):
    dataset = ImageFolderDataset(ten_images, to_tensor)
    loader = make_train_loader(dataset, batch_size=3, workers=0, seed=1, drop_last=False)
    first = [i for _, _, i in epochs(loader, 3)[2] for i in i]
    resumed = make_train_loader(dataset, batch_size=3, workers=0, seed=1, drop_last=False)
    resumed.sampler.set_epoch(2)  # a resumed run jumps straight to epoch 2
    assert [i for _, _, idx in resumed for i in idx.tolist()] == first
    assert sorted(first) == list(range(10))  # drop_last=False keeps the tail batch


def test_train_loader_shards_under_distributed(ten_images, monkeypatch):
    dataset = ImageFolderDataset(ten_images, to_tensor)
    monkeypatch.setattr(folders, "world_size", lambda: 2)
    shards = []
    for r in (0, 1):
        monkeypatch.setattr(folders, "rank", lambda r=r: r)
        shards.append([i for _, _, idx in make_train_loader(dataset, 2, 0, seed=0) for i in idx.tolist()])
    assert len(shards[0]) == len(shards[1]) == 4  # 5 per rank, 2 full batches of 2 each
    assert not set(shards[0]) & set(shards[1])


def test_eval_loader_keeps_every_item_in_order(ten_images):
    dataset = ImageFolderDataset(ten_images, to_tensor)
    indices = [i for _, _, idx in make_eval_loader(dataset, batch_size=4, workers=0) for i in idx.tolist()]
    assert indices == list(range(10))


# ---------------------------------------------------------------- prepare_splits

CLASSES = ("running", "sitting", "using_laptop")


@pytest.fixture
def flat(tmp_path):
    """8 images per class in the distributed layout, plus one example of every problem."""
    csv_path, images = write_flat_csv_layout(tmp_path / "flat", per_class=8, image_size=16, class_names=CLASSES)
    rows = list(csv.reader(open(csv_path)))
    first_running = next(r[0] for r in rows if r[1] == "running")
    first_sitting = next(r[0] for r in rows if r[1] == "sitting")
    for name in ("Image_97.png", "Image_98.png", "Image_99.png"):  # 97: no row mentions it
        write_png(images / name)
    rows += [[first_running, "running"],  # repeated row: kept once
             [first_sitting, "using_laptop"],  # second label for the same file: the file is dropped
             ["Image_404.png", "running"],  # missing file
             ["Image_98.png", ""],  # empty label
             ["Image_99.png", "../running"]]  # a label that is no folder name
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return csv_path, images, first_running, first_sitting


def split_of(out: Path) -> dict:
    return {(split, c): sorted(p.name for p in (out / split / c).iterdir()) for split in ("train", "test")
            for c in CLASSES}


def test_prepare_splits_stratified_linked_and_reported(tmp_path, flat):
    csv_path, images, first_running, first_sitting = flat
    out = tmp_path / "out"
    report = prepare_splits(csv_path, images, out, test_per_class=2, seed=0)
    assert report["classes"] == {"running": {"train": 6, "test": 2}, "sitting": {"train": 5, "test": 2},
                                 "using_laptop": {"train": 6, "test": 2}}
    assert report["rows"] == 29 and report["used"] == 23 and report["link_used"] == ["symlink"]
    assert report["duplicate_rows"]["count"] == 1
    assert report["duplicate_rows"]["examples"][0]["filename"] == first_running
    assert report["conflicting_labels"]["examples"] == [{"line": 27, "filename": first_sitting,
                                                         "label": "using_laptop"}]
    assert report["missing_files"]["examples"][0]["filename"] == "Image_404.png"
    assert [(e["label"], e["why"]) for e in report["invalid_rows"]["examples"]] == [
        ("", "empty label"), ("../running", "label contains a path separator ('/' or '\\')")]
    assert report["unlisted_files"] == {"count": 1, "examples": ["Image_97.png"]}
    assert json.loads((out / "prepare_report.json").read_text()) == report
    assignment = split_of(out)
    assert first_sitting not in sum(assignment.values(), [])
    link = out / "train" / "running" / assignment["train", "running"][0]
    assert link.is_symlink() and link.resolve() == (images / link.name).resolve()
    labels = dict(csv.reader(open(csv_path)))
    assert all(labels[name] == c for (_, c), names in assignment.items() for name in names if name != first_sitting)
    train, test, classes = build_splits(out)
    assert classes == list(CLASSES) and len(train) == 17 and len(test) == 6

    prepare_splits(csv_path, images, tmp_path / "again", test_per_class=2, seed=0)
    assert split_of(tmp_path / "again") == assignment
    prepare_splits(csv_path, images, tmp_path / "other", test_per_class=2, seed=1)
    assert split_of(tmp_path / "other") != assignment


def test_prepare_splits_refuses_and_falls_back(tmp_path, flat, monkeypatch):
    csv_path, images, _, _ = flat
    out = tmp_path / "out"
    prepare_splits(csv_path, images, out, test_per_class=2)
    with pytest.raises(ValueError, match="is not empty"):
        prepare_splits(csv_path, images, out, test_per_class=2)
    with pytest.raises(ValueError, match="class 'sitting' has 7 usable images"):
        prepare_splits(csv_path, images, tmp_path / "x", test_per_class=7)

    def no_symlinks(*args):
        raise OSError("symlinks not permitted")
    monkeypatch.setattr(os, "symlink", no_symlinks)
    report = prepare_splits(csv_path, images, out, test_per_class=3, overwrite=True)
    assert report["link_used"] == ["hardlink"] and "fell back to hardlink" in report["note"]
    assert sum(c["test"] for c in report["classes"].values()) == 9
    copied = prepare_splits(csv_path, images, tmp_path / "copied", test_per_class=2, link="copy")
    assert copied["link_used"] == ["copy"] and "note" not in copied
    file = next((tmp_path / "copied" / "train" / "running").iterdir())
    assert not file.is_symlink() and file.read_bytes() == (images / file.name).read_bytes()


def test_prepare_splits_bad_header(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\nImage_1.png,running\n")
    with pytest.raises(ValueError, match="'filename,label' header"):
        prepare_splits(bad, tmp_path, tmp_path / "out")


UNUSUAL_CLASSES = ("arm wrestling", "café dancing", "high-jump", "o'neill pose", "2 people")


def test_prepare_keeps_class_names_with_spaces_and_accents(tmp_path, capsys):
    """Spaces, hyphens, apostrophes, digits and non-ASCII letters make ordinary folder names;
    only unsafe labels are refused, each row named with why (report and printout)."""
    from har_ref.__main__ import main

    images = tmp_path / "images"
    images.mkdir()
    rows = [("filename", "label")]
    for c, name in enumerate(UNUSUAL_CLASSES):
        for k in range(3):
            write_png(images / f"img_{c}_{k}.png")
            rows.append((f"img_{c}_{k}.png", name))
    bad = {"bad_0.png": ".hidden", "bad_1.png": "..", "bad_2.png": "a/b", "bad_3.png": "tab\there"}
    for name, label in bad.items():
        write_png(images / name)
        rows.append((name, label))
    csv_path = tmp_path / "labels.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    main(["prepare", "--csv", str(csv_path), "--images", str(images), "--out", str(tmp_path / "out"),
          "--test-per-class", "1"])
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text(encoding="utf-8"))
    assert sorted(report["classes"]) == sorted(UNUSUAL_CLASSES)
    assert report["invalid_rows"]["count"] == 4
    assert [e["filename"] for e in report["invalid_rows"]["examples"]] == list(bad)
    assert all(e["why"] for e in report["invalid_rows"]["examples"])
    assert "line 17: 'bad_0.png', label '.hidden': label starts with '.'" in printed
    assert "café dancing" in (tmp_path / "out" / "prepare_report.json").read_text(encoding="utf-8")
    train, test, classes = build_splits(tmp_path / "out")
    assert classes == sorted(UNUSUAL_CLASSES) and len(train) == 10 and len(test) == 5


def test_packaged_prompt_bank_serves_any_label_set(capsys):
    """Generic templates for every class, the packaged extras for the classes present, one note for the rest."""
    spec = json.loads(DEFAULT_PROMPTS.read_text())
    bank = PromptBank.from_file(None, ["arm wrestling", "café dancing", "calling"])
    assert bank.templates_for("café dancing") == [t.replace("{}", "café dancing") for t in spec["templates"]]
    assert bank.templates_for("calling")[-2:] == spec["class_templates"]["calling"]
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and "extra templates for 14 classes not in this label set are skipped" in notes[0]
    assert class_phrase("arm wrestling") == "arm wrestling" and class_phrase("listening_to_music") == "listening to music"


@pytest.mark.parametrize("batch_size, world", [(64, 1), (64, 2), (30, 1)])
def test_balanced_batches_hold_every_class_within_one_of_its_share(batch_size, world, monkeypatch):
    """--balanced-batches: in every micro-batch of every rank, each of the 15 classes appears
    floor or ceil of B / 15 times; every rank's epoch is a different part of one order."""
    labels = [c for c in range(15) for _ in range(40)]
    dataset = list(range(len(labels)))
    shards = []
    for rank in range(world):
        monkeypatch.setattr(folders, "world_size", lambda: world)
        monkeypatch.setattr(folders, "rank", lambda rank=rank: rank)
        sampler = folders.BalancedEpochSampler(dataset, labels, batch_size, seed=3, drop_last=True)
        sampler.set_epoch(1)
        keys = list(sampler)
        assert len(keys) == len(sampler) and all(epoch == 1 for epoch, _ in keys)
        shards.append([i for _, i in keys])
    for shard in shards:
        for start in range(0, len(shard), batch_size):
            counts = np.bincount([labels[i] for i in shard[start:start + batch_size]], minlength=15)
            assert counts.min() >= batch_size // 15 and counts.max() <= -(-batch_size // 15)
    everything = [i for shard in shards for i in shard]
    assert len(everything) == len(set(everything))  # no image twice in an epoch, across ranks
    sampler.set_epoch(2)
    assert [i for _, i in sampler] != shards[-1]  # another order every epoch
