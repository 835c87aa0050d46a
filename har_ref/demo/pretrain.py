"""`make pretrain`: the demo's tiny CLIP and SigLIP, pretrained on synthetic image-caption pairs.

The study fine-tunes pretrained checkpoints, so the demo starts from pretrained ones too. No real
ones can be downloaded here, so the project makes its own, the way the real ones were made (CLIP
sec. 2.3, SigLIP sec. 4): a contrastive loss over image-caption pairs, one positive per row (the
diagonal: no labels, captions are almost all distinct), CLIP with InfoNCE, SigLIP with the sigmoid
loss and its bias started at logit(1/B) (one positive among B candidates; `logit_bias_for`).

The data: N "looks" (skin, hair, background, which way the person faces) drawn once each and shown
doing all 15 actions (`draw_scene` with a seed that holds no class), and batches of 25 looks x 5 of
their actions. Inside a batch, captions of one look differ only in the action, so the towers must
learn poses and props, not colours; without this grouping the tiny models' zero-shot accuracy stayed
near chance (docs/demo.md has the measurements). The seeds are disjoint from the demo's dataset.

Both checkpoints are written with export_hf, in transformers' format (config.json, model.safetensors,
tokenizer and preprocessor files), to har_ref/demo/checkpoints/{clip,siglip}/ with manifest.json:
the command, seed, each file's sha256, the training time and the zero-shot accuracy on the demo's
test split. Same seed, same bytes (each model trains on one thread).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..data.classes import CLASS_NAMES
from ..data.prompts import PromptBank
from ..eval.evaluate import evaluate_model
from ..model.dual_encoder import DualEncoder, save_model
from ..model.tokenizer import ClipTokenizer, SiglipTokenizer, load_tokenizer
from ..model.transforms import normalize_uint8
from ..train.losses import clamp_logit_scale_, clip_loss, logit_bias_for, siglip_loss
from ..train.optim import build_optimizer, warmup_cosine
from .captions import caption
from .demo import demo_dataset
from .synthetic import draw_scene
from .tiny import CHECKPOINTS, IMAGE_SIZE, tiny_config
from .tokenizer_training import train_clip_bpe, train_sentencepiece

LOOKS, ACTIONS_PER_GROUP, GROUPS_PER_BATCH = 1000, 5, 25  # 15,000 pairs; batches of 125
EPOCHS, LR, WEIGHT_DECAY, WARMUP_STEPS = 20, 2e-3, 0.05, 100
VOCAB = {"clip": 1000, "siglip": 400}


def captioned_scenes(seed: int) -> tuple[torch.Tensor, list[str]]:
    """uint8 pixels [LOOKS * 15, 3, 64, 64] and their captions; row 15 * look + class."""
    images, captions = [], []
    for look in range(LOOKS):
        for name in CLASS_NAMES:
            rng = np.random.default_rng([1000 + seed, look])  # no class in the seed: one look, 15 actions
            image, facts = draw_scene(name, rng, IMAGE_SIZE, variation=0.0)
            images.append(np.asarray(image))
            captions.append(caption(name, facts, rng))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions


def grouped_order(generator: torch.Generator) -> torch.Tensor:
    """One epoch's row order: each look's 15 actions cut at random into groups of 5, groups shuffled."""
    K = len(CLASS_NAMES)
    groups = [15 * look + torch.randperm(K, generator=generator)[g * ACTIONS_PER_GROUP:(g + 1) * ACTIONS_PER_GROUP]
              for look in range(LOOKS) for g in range(K // ACTIONS_PER_GROUP)]
    return torch.cat([groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()])


def pretrain_one(family: str, out: Path, data: Path, seed: int) -> dict:
    """Pretrain one family into OUT (har_ref format); returns its manifest entry."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    pixels, captions = captioned_scenes(seed)
    prompts, _ = PromptBank.from_file(None, list(CLASS_NAMES)).all_prompts()
    texts = captions + prompts  # the tokenizer must also cover the prompts zero-shot evaluation uses
    if family == "clip":
        tok = train_clip_bpe(texts, out, vocab_size=VOCAB[family])
        lengths = ClipTokenizer(out, context_length=512)(texts)[1].sum(1)
    else:
        tok = train_sentencepiece(texts, out, vocab_size=VOCAB[family])
        lengths = SiglipTokenizer(out, context_length=512)(texts)[1].sum(1)
    tok["context_length"] = int(lengths.max()) + (0 if family == "clip" else 4)  # SigLIP: some padding, as trained
    torch.manual_seed(seed)
    model = DualEncoder(tiny_config(family, tok))
    batch = ACTIONS_PER_GROUP * GROUPS_PER_BATCH
    if family == "siglip":
        with torch.no_grad():
            model.logit_bias.fill_(logit_bias_for(1 / batch))  # one positive per row
    save_model(model, out)
    ids = load_tokenizer(out)(captions)[0]
    optimizer = build_optimizer(model, LR, WEIGHT_DECAY)
    steps = len(captions) // batch
    scheduler = warmup_cosine(optimizer, WARMUP_STEPS, steps * EPOCHS)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    log = []
    for epoch in range(EPOCHS):
        order, losses = grouped_order(generator), []
        for step in range(steps):
            rows = order[step * batch:(step + 1) * batch]
            image = model.encode_image(normalize_uint8(pixels[rows], model.cfg))
            text = model.encode_text(ids[rows])
            loss = (clip_loss(image, text, model.logit_scale) if family == "clip" else
                    siglip_loss(image, text, model.logit_scale, model.logit_bias))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clamp_logit_scale_(model.logit_scale, family)
            scheduler.step()
            losses.append(loss.item())
        log.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), "logit_scale": model.logit_scale.item(),
                    "logit_bias": None if model.logit_bias is None else model.logit_bias.item()})
        print(f"[pretrain] {family} epoch {epoch + 1}/{EPOCHS}: loss {log[-1]['loss']:.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    train_s = time.perf_counter() - start
    model.eval()
    save_model(model, out)
    with tempfile.TemporaryDirectory() as scratch:
        zero_shot = evaluate_model(model, load_tokenizer(out), data, scratch)
    return {"pairs": len(captions), "distinct_captions": len(set(captions)), "epochs": EPOCHS, "batch": batch,
            "lr": LR, "training_time_s": round(train_s), "log": log,
            "zero_shot_on_demo_test": {"accuracy": zero_shot["accuracy"], "macro_f1": zero_shot["macro_f1"]}}


def _run(family: str, out: Path, data: Path, seed: int, queue) -> None:
    queue.put((family, pretrain_one(family, out, data, seed)))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pretrain(out: str | Path = CHECKPOINTS, seed: int = 0) -> Path:
    """Both families in parallel (one core each), exported to OUT/{clip,siglip} with OUT/manifest.json."""
    from weights_conversion.export_hf import export_hf  # har_ref's own writer of transformers' format

    out = Path(out)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = demo_dataset(scratch / "data", seed=0)  # zero-shot is measured on the demo's test split
        context, queue = mp.get_context("spawn"), mp.get_context("spawn").Queue()
        processes = [context.Process(target=_run, args=(f, scratch / f, data, seed, queue)) for f in ("clip", "siglip")]
        for p in processes:
            p.start()
        results = dict(queue.get() for _ in processes)
        for p in processes:
            p.join()
            if p.exitcode:
                raise RuntimeError(f"pretraining failed (exit {p.exitcode}); see the output above.")
        manifest = {"command": f"python -m har_ref pretrain --out {out} --seed {seed}", "seed": seed,
                    "torch": torch.__version__, "wall_time_s": None, "models": {}}
        for family in ("clip", "siglip"):
            shutil.rmtree(out / family, ignore_errors=True)
            export_hf(scratch / family, out / family)
            files = {p.name: sha256(p) for p in sorted((out / family).iterdir())}
            manifest["models"][family] = {**results[family], "sha256": files}
    manifest["wall_time_s"] = round(time.perf_counter() - start)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for family, entry in manifest["models"].items():
        z = entry["zero_shot_on_demo_test"]
        print(f"[pretrain] {family}: {entry['training_time_s']} s, zero-shot accuracy {z['accuracy']:.3f}, "
              f"macro-F1 {z['macro_f1']:.3f} -> {out / family}")
    shipped = CHECKPOINTS / "manifest.json"
    if out.resolve() != CHECKPOINTS.resolve() and shipped.is_file():  # a rebuild elsewhere: compare with the shipped
        expected = json.loads(shipped.read_text())["models"]
        for family, entry in manifest["models"].items():
            differ = sorted(n for n, h in entry["sha256"].items() if expected[family]["sha256"].get(n) != h)
            print(f"[pretrain] {family}: " + (f"files differ from the shipped checkpoint: {', '.join(differ)}" if differ
                                              else "every file has the shipped checkpoint's sha256"))
    return out
