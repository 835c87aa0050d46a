"""Bad input a real dataset, checkpoint or command line brings: each case is either
converted correctly, or skipped and reported, or refused with one sentence and exit status 2.

Commands run in process through har_ref.__main__.main, which is what `python -m har_ref` calls: an
exception it did not turn into a message would fail the test (test_cli.py checks the subprocess
form, with no "Traceback" on stderr).
"""
from __future__ import annotations

import ast
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from har_ref.__main__ import main
from har_ref.data.folders import ImageFolderDataset, build_splits, image_problem, non_image_files
from har_ref.demo.synthetic import generate
from har_ref.model.transforms import load_image, pil_to_uint8

pytestmark = pytest.mark.usefixtures("one_thread")


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature and IHDR claiming width x height, and no pixel data: 70 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


def gradient(width: int = 48, height: int = 32) -> Image.Image:
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def write_weird_folder(folder: Path) -> dict[str, str]:
    """Every kind of file the issue lists; returns name -> what must happen to it."""
    folder.mkdir(parents=True, exist_ok=True)
    gradient().save(folder / "good.png")
    (folder / "zero.jpg").write_bytes(b"")
    buffer = folder / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, quality=95)
    (folder / "truncated.jpg").write_bytes(buffer.read_bytes()[:2000])
    buffer.unlink()
    (folder / "text.jpg").write_text("this is a text file, not a JPEG")
    alpha = Image.new("RGBA", (20, 10), (0, 0, 255, 255))
    alpha.paste((255, 0, 0, 0), (0, 0, 10, 10))  # left half: red, fully transparent
    alpha.save(folder / "alpha.png")
    palette = Image.new("P", (10, 10), 3)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 9, 9, 9] + [0] * 756)
    palette.paste(1, (0, 0, 5, 10))  # left half red (index 1), right half index 3 = transparent
    palette.save(folder / "palette.png", transparency=3)
    gradient().convert("L").save(folder / "gray.png")
    gradient().convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    sixteen = (np.arange(32 * 48).reshape(32, 48) * 42 % 65536).astype(np.uint16)
    Image.fromarray(sixteen).save(folder / "sixteen.png")
    rotated = Image.new("RGB", (40, 20), (0, 0, 255))
    rotated.paste((255, 0, 0), (0, 0, 20, 20))  # left red, right blue; displayed rotated 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    png_header_only(folder / "bomb.png", 30_000, 30_000)  # 9e8 pixels from a 70-byte file
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    (folder / "Thumbs.db").write_bytes(bytes(64))
    return {"zero.jpg": "skip", "truncated.jpg": "skip", "text.jpg": "skip", "bomb.png": "skip",
            ".DS_Store": "ignore", "Thumbs.db": "ignore", "good.png": "keep", "alpha.png": "keep",
            "palette.png": "keep", "gray.png": "keep", "cmyk.jpg": "keep", "sixteen.png": "keep",
            "rotated.jpg": "keep"}


def test_every_kind_of_image_file_is_converted_or_skipped(tmp_path):
    expected = write_weird_folder(tmp_path / "train" / "calling")
    for split in ("train", "test"):
        gradient().save((tmp_path / split / "clapping").mkdir(parents=True, exist_ok=True)
                        or tmp_path / split / "clapping" / "ok.png")
    gradient().save((tmp_path / "test" / "calling").mkdir(parents=True) or tmp_path / "test" / "calling" / "ok.png")
    train_items, _, _ = build_splits(tmp_path)
    dataset = ImageFolderDataset(train_items, lambda image: pil_to_uint8(image))
    skipped = {Path(p).name: reason for p, reason in dataset.skipped}
    kept = {Path(p).name for p, _ in dataset.items}
    ignored = {Path(p).name for p, _ in non_image_files(tmp_path)}
    assert set(skipped) == {n for n, e in expected.items() if e == "skip"}
    assert kept == {n for n, e in expected.items() if e == "keep"} | {"ok.png"}
    assert ignored == {n for n, e in expected.items() if e == "ignore"}
    assert "DecompressionBomb" in skipped["bomb.png"] and "truncated" in skipped["truncated.jpg"]

    folder = tmp_path / "train" / "calling"
    pixels = {name: np.asarray(load_image(folder / name)) for name in kept - {"ok.png"}}
    assert all(p.ndim == 3 and p.shape[2] == 3 and p.dtype == np.uint8 for p in pixels.values())
    assert (pixels["alpha.png"][:, :10] == 255).all() and (pixels["alpha.png"][:, 10:] == (0, 0, 255)).all()
    assert (pixels["palette.png"][:, 5:] == 255).all() and (pixels["palette.png"][:, :5] == (255, 0, 0)).all()
    gray = np.asarray(gradient().convert("L"))
    assert all((pixels["gray.png"][..., c] == gray).all() for c in range(3))
    assert np.abs(pixels["cmyk.jpg"].astype(int) - np.asarray(gradient(), int)).mean() < 4  # JPEG noise only
    sixteen = np.asarray(Image.open(folder / "sixteen.png"), dtype=np.float64)
    assert (pixels["sixteen.png"][..., 0] == np.rint(sixteen / 257)).all()  # not clipped to white
    assert pixels["sixteen.png"].mean() < 200 and np.asarray(Image.open(folder / "sixteen.png").convert("RGB")).mean() > 250
    rotated = pixels["rotated.jpg"]
    assert rotated.shape[:2] == (40, 20) and rotated[5, 10, 0] > 200 and rotated[35, 10, 2] > 200  # red on top


def test_images_between_the_bomb_limit_and_twice_it_are_refused_too(tmp_path, monkeypatch):
    """Pillow only warns (and decodes) up to twice MAX_IMAGE_PIXELS; har_ref refuses from the limit."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    gradient(40, 40).save(tmp_path / "big.png")  # 1,600 pixels: between 1x and 2x the limit
    gradient(30, 30).save(tmp_path / "small.png")
    assert "decompression-bomb limit of 1000 pixels" in image_problem(tmp_path / "big.png")
    with pytest.raises(ValueError, match="decompression-bomb"):
        load_image(tmp_path / "big.png")
    assert image_problem(tmp_path / "small.png") is None


# ---------------------------------------------------------------- whole commands

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_weights):
    root = tmp_path_factory.mktemp("tiny")
    generate(root / "data", train_per_class=2, test_per_class=1, image_size=32, seed=0)
    return root / "data", tiny_weights


def train_args(data, weights, out, *extra, model="clip"):
    return ["train", "--model", model, "--weights", str(weights[model]), "--data", str(data), "--out", str(out),
            "--epochs", "1", "--micro-batch", "8", "--accum-steps", "1", "--xbm-size", "0", "--precision", "fp32",
            "--workers", "0", "--lr", "1e-3", "--warmup-steps", "1", *extra]


def one_error(capsys, code: int, expected_code: int = 2) -> str:
    err = capsys.readouterr().err.strip()
    assert code == expected_code, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_training_skips_bad_images_lists_them_and_goes_on(tiny, tmp_path, capsys):
    data, weights = tiny
    shutil.copytree(data, tmp_path / "data")
    expected = write_weird_folder(tmp_path / "data" / "train" / "calling")
    assert main(train_args(tmp_path / "data", weights, tmp_path / "run")) == 0
    out = capsys.readouterr().out
    assert "4 unreadable image(s) skipped, 2 non-image file(s) ignored" in out
    lines = [line.split("\t") for line in (tmp_path / "run" / "skipped.txt").read_text().splitlines()[1:]]
    assert sorted(Path(path).name for _, path, _ in lines) == sorted(n for n, e in expected.items() if e != "keep")
    assert all(split == "train" and reason for split, _, reason in lines)
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text())["skipped_images"] == 4


def test_a_class_with_no_readable_image_is_an_error_naming_it(tiny, tmp_path, capsys):
    data, weights = tiny
    shutil.copytree(data, tmp_path / "data")
    for file in (tmp_path / "data" / "train" / "clapping").iterdir():
        file.write_text("broken")
    err = one_error(capsys, main(train_args(tmp_path / "data", weights, tmp_path / "run")))
    assert "train/clapping have no readable image" in err and "calling" not in err


@pytest.mark.parametrize("damage, message", [
    ("no_train", "train is not a directory"),
    ("no_test", "test is not a directory"),
    ("no_class_folders", "has no class folders"),
    ("different_classes", "train and test have different class folders (missing from test: ['texting']"),
    ("empty_split", "test/calling has no image files"),
])
def test_data_layout_mistakes_are_one_sentence_and_exit_2(tiny, tmp_path, capsys, damage, message):
    data, weights = tiny
    root = tmp_path / "data"
    shutil.copytree(data, root)
    if damage == "no_train":
        shutil.rmtree(root / "train")
    elif damage == "no_test":
        shutil.rmtree(root / "test")
    elif damage == "no_class_folders":
        shutil.rmtree(root / "train")
        (root / "train").mkdir()
    elif damage == "different_classes":
        shutil.rmtree(root / "test" / "texting")
    else:
        for file in (root / "test" / "calling").iterdir():
            file.unlink()
    err = one_error(capsys, main(train_args(root, weights, tmp_path / "run")))
    assert message in err
    assert not (tmp_path / "run" / "checkpoint").exists()


# ---------------------------------------------------------------- checkpoints

def damage_checkpoint(src: Path, dst: Path, how: str, other: Path) -> None:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    tensors = load_file(str(weights))
    if how == "not_safetensors":
        weights.write_text("<html>404 Not Found</html>")
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif how == "other_family":
        shutil.copy(other / "config.json", dst / "config.json")
    elif how == "missing":
        save_file({k: v for k, v in tensors.items() if k != "text.ln_final.weight"}, str(weights))
    elif how == "extra":
        save_file({**tensors, "vision.surprise": torch.zeros(3)}, str(weights))
    elif how == "misshaped":
        save_file({**tensors, "text.ln_final.weight": torch.zeros(7)}, str(weights))
    elif how == "config_contradicts":
        config = json.loads((dst / "config.json").read_text())
        config["text"]["width"] *= 2
        (dst / "config.json").write_text(json.dumps(config))
    elif how == "config_not_json":
        (dst / "config.json").write_text("{'family': 'clip',")
    elif how == "config_unknown_field":
        config = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**config, "hidden_size": 768}))


@pytest.mark.parametrize("how, message", [
    ("not_safetensors", "is not a readable safetensors file"),
    ("truncated", "is not a readable safetensors file"),
    ("other_family", "holds CLIP weights but config.json next to it describes SigLIP"),
    ("missing", "missing ['text.ln_final.weight']"),
    ("extra", "unexpected ['vision.surprise']"),
    ("misshaped", "wrong shape ['text.ln_final.weight (7,) != (64,)']"),
    ("config_contradicts", "wrong shape ["),
    ("config_not_json", "is not valid JSON"),
    ("config_unknown_field", "is not a har_ref model config"),
])
def test_damaged_checkpoints_are_one_sentence_and_exit_2(tiny, tmp_path, capsys, how, message):
    data, weights = tiny
    damage_checkpoint(weights["clip"], tmp_path / "ckpt", how, other=weights["siglip"])
    err = one_error(capsys, main(["evaluate", "--weights", str(tmp_path / "ckpt"), "--data", str(data),
                                  "--out", str(tmp_path / "eval")]))
    assert message in err


class NotATensor:
    """Anything torch.load(weights_only=True) must refuse to build."""


@pytest.mark.parametrize("how", ["pickled_object", "truncated", "other_family"])
def test_damaged_training_state_is_refused_on_resume(tiny, tmp_path, capsys, how):
    data, weights = tiny
    run = tmp_path / "run"
    assert main(train_args(data, weights, run)) == 0
    state = run / "checkpoint" / "trainer_state.pt"
    if how == "pickled_object":
        torch.save({"optimizer": NotATensor()}, state)
    elif how == "truncated":
        state.write_bytes(state.read_bytes()[:300])
    else:
        shutil.copy(weights["siglip"] / "model.safetensors", run / "checkpoint" / "model.safetensors")
    capsys.readouterr()
    err = one_error(capsys, main(train_args(data, weights, run, "--resume")))
    if how == "other_family":
        assert "holds SigLIP weights but config.json next to it describes CLIP" in err
    else:
        assert "trainer_state.pt cannot be read" in err and "start the run again" in err
        assert ("never unpickles" in err) == (how == "pickled_object")


# ---------------------------------------------------------------- command line

def test_unknown_model_name_exits_2(tiny, tmp_path, capsys):
    data, weights = tiny
    args = train_args(data, weights, tmp_path / "run")
    args[args.index("clip")] = "vit-huge"
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2 and "invalid choice: 'vit-huge'" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--micro-batch", "0", "--micro-batch (the batch size) must be a positive number of images, got 0"),
    ("--micro-batch", "-8", "--micro-batch (the batch size) must be a positive number of images, got -8"),
    ("--eval-batch", "0", "--eval-batch must be positive"),
    ("--max-nonfinite", "0", "--max-nonfinite must be at least 1"),
])
def test_bad_numbers_exit_2(tiny, tmp_path, capsys, flag, value, message):
    data, weights = tiny
    err = one_error(capsys, main(train_args(data, weights, tmp_path / "run", flag, value)))
    assert message in err


def test_an_output_directory_holding_another_run_is_refused(tiny, tmp_path, capsys):
    data, weights = tiny
    run = tmp_path / "run"
    assert main(train_args(data, weights, run)) == 0
    capsys.readouterr()
    err = one_error(capsys, main(train_args(data, weights, run, model="siglip")))
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    err = one_error(capsys, main(train_args(data, weights, run, "--resume", "--lr", "5e-4")))
    assert "was trained with other settings (lr: 0.001 -> 0.0005)" in err
    err = one_error(capsys, main(train_args(data, weights, weights["clip"])))
    assert "is the --weights directory" in err
    assert main(train_args(data, weights, run, "--overwrite", model="siglip")) == 0
    assert json.loads((run / "train_config.json").read_text())["model"] == "siglip"


UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("torch.jit", "load"),
              ("numpy", "load")}  # numpy: only with allow_pickle=True


def loads_in(path: Path) -> list[tuple[str, int, bool]]:
    """(what, line, safe) for every call in `path` that reads a pickle: torch.load however it was imported
    (`import torch as t`, `from torch import load`), safe only with weights_only=True; pickle.load(s),
    torch.jit.load and numpy.load(allow_pickle=True) are never safe."""
    tree = ast.parse(path.read_text())
    modules, functions = {}, {}  # local name -> module name / (module, function)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update({a.asname or a.name: a.name for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module:
            functions.update({a.asname or a.name: (node.module, a.name) for a in node.names})
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in functions:
            target = functions[func.id]
        elif isinstance(func, ast.Attribute):
            owner = ast.unparse(func.value)
            head, _, rest = owner.partition(".")
            target = (".".join(filter(None, [modules.get(head, head), rest])), func.attr)
        else:
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        constant_true = lambda key: isinstance(keywords.get(key), ast.Constant) and keywords[key].value is True
        if target == ("torch", "load"):
            found.append(("torch.load", node.lineno, constant_true("weights_only")))
        elif target in UNPICKLERS and (target[0] != "numpy" or constant_true("allow_pickle")):
            found.append((".".join(target), node.lineno, False))
    return found


def test_nothing_is_unpickled_without_weights_only():
    """Every torch.load in the package and the converters, in every sub-folder, passes weights_only=True,
    and nothing else unpickles (read from the source)."""
    root = Path(__file__).resolve().parents[1]
    calls = {}
    for package in ("har_ref", "weights_conversion"):
        for path in sorted((root / package).rglob("*.py")):
            for what, line, safe in loads_in(path):
                calls[f"{path.relative_to(root)}:{line} {what}"] = safe
    # the scan reaches sub-folders: har_ref's resume (har_ref/train/checkpoint.py) and the converters' reader
    assert any(c.startswith("har_ref/train/") for c in calls) and any(c.startswith("weights_conversion/")
                                                                       for c in calls), calls
    assert all(calls.values()), [c for c, safe in calls.items() if not safe]
