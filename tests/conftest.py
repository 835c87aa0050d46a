"""Shared test plumbing: measured differences are printed in the summary of every run.

Tests call `measured("...")` with what they found (e.g. the max |difference| against upstream),
so `make test` shows the numbers, not only that they were within tolerance.

The upstream implementations the tests compare har_ref with (pyproject.toml's `test` extra) are
required, never skipped: without one of them the run stops before collecting anything.
"""
from __future__ import annotations

import importlib.util

import pytest

_MEASURED: list[str] = []
# module imported by the tests -> the package of the test extra that provides it
TEST_EXTRA = {"transformers": "transformers", "open_clip": "open_clip_torch", "sklearn": "scikit-learn",
              "scipy": "scipy"}


def pytest_configure(config):
    missing = [package for module, package in TEST_EXTRA.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise pytest.UsageError(f"the test extra is not installed ({', '.join(missing)} missing): the tests compare "
                                "har_ref with these upstream implementations and never skip them; run `make test` "
                                "(it installs them), or `pip install -e '.[test]'`.")


@pytest.fixture()
def measured():
    return _MEASURED.append


def pytest_terminal_summary(terminalreporter):
    if _MEASURED:
        terminalreporter.section("measured")
        for line in _MEASURED:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: on a busy 2-core machine handing work to a second thread costs more than the math."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """{family: directory} of the demo's tiny CLIP and SigLIP checkpoints (random weights, their own
    BPE / SentencePiece tokenizers trained on the prompt bank), built once per test session."""
    from har_ref.data.prompts import PromptBank
    from tiny_checkpoint import make_tiny_checkpoint
    from har_ref.demo.synthetic import CLASS_NAMES

    texts, _ = PromptBank.from_file(None, list(CLASS_NAMES)).all_prompts()
    root = tmp_path_factory.mktemp("tiny_weights")
    return {family: make_tiny_checkpoint(family, texts, root / family, seed=0) for family in ("clip", "siglip")}


OPEN_CLIP_ARCHS = ("ViT-B-32", "ViT-B-32-quickgelu")
OPEN_CLIP_PROMPTS = ["a photo of a person running.", "Two people hugging!",
                     "a photo of " + "a very " * 40 + "tall person"]  # the last one is truncated to 77 tokens
OPENAI_METADATA_KEYS = dict(input_resolution=224, context_length=77, vocab_size=49408)


@pytest.fixture(scope="session")
def real_size(request, tmp_path_factory):
    """A real-size upstream checkpoint, built, saved and converted once per test session.

    request.param: "clip" (CLIPModel, ViT-B/32) or "siglip" (SiglipModel, base/16-224), seeded and
    randomized, saved with save_pretrained as upstream writes it (hf/) and converted (har_ref/); or
    "open_clip" (an open_clip ViT-B-32 state dict with its outputs under both activations, converted from
    a .safetensors and an OpenAI-style .pt). Tests ask for one with
    `@pytest.mark.parametrize("real_size", [name], indirect=True)`. pytest then runs every test of one
    checkpoint together and removes its files before it builds the next, so at most one real-size
    checkpoint is on disk at any time (~1.6 GB for SigLIP).
    """
    import shutil

    root = tmp_path_factory.mktemp(f"real_size_{request.param}")
    yield (_open_clip_checkpoint if request.param == "open_clip" else _hf_checkpoint)(request.param, root)
    shutil.rmtree(root, ignore_errors=True)


def _hf_checkpoint(family: str, root):
    from types import SimpleNamespace

    import torch
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    from test_model_parity import convert_upstream

    torch.manual_seed(0)
    up = CLIPModel(CLIPConfig()) if family == "clip" else SiglipModel(SiglipConfig())
    ours = convert_upstream(up, root)  # randomize, save_pretrained to hf/, convert to har_ref/, load
    # tests that draw their inputs from the global generator start from where building left it,
    # so their inputs do not depend on which test happened to build the checkpoint
    return SimpleNamespace(up=up.eval(), ours=ours, hf=root / "hf", converted=root / "har_ref",
                           rng_state=torch.get_rng_state())


def _open_clip_checkpoint(name: str, root):
    """Seeded randomized open_clip weights, inputs, open_clip's outputs under each activation, and the weights
    converted by the CLI from a .safetensors file and from an OpenAI-style .pt (sources then removed)."""
    from types import SimpleNamespace

    import open_clip
    import torch
    from open_clip.tokenizer import default_bpe
    from safetensors.torch import save_file

    from test_model_parity import randomize
    from weights_conversion.__main__ import main

    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    ids = open_clip.tokenize(OPEN_CLIP_PROMPTS)
    state_dict, outputs = None, {}
    for arch in OPEN_CLIP_ARCHS:
        model = open_clip.create_model(arch, pretrained=None).eval()
        if state_dict is None:  # randomized as test_model_parity's: open_clip's init leaves attention near uniform
            state_dict = randomize(model).state_dict()
        model.load_state_dict(state_dict)  # the same weights under both activations
        with torch.no_grad():
            img = model.encode_image(images, normalize=True)
            txt = model.encode_text(ids, normalize=True)
            outputs[arch] = (img, txt, model.logit_scale.exp() * img @ txt.T)
        del model
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(root / "vit_b_32.safetensors"))
    metadata = {k: torch.tensor(v) for k, v in OPENAI_METADATA_KEYS.items()}
    torch.save({**state_dict, **metadata}, root / "openai_vit_b_32.pt")
    args = {"ViT-B-32": ["--src", str(root / "vit_b_32.safetensors"), "--bpe", default_bpe()],
            "ViT-B-32-quickgelu": ["--src", str(root / "openai_vit_b_32.pt")]}
    converted = {}
    for arch in OPEN_CLIP_ARCHS:
        converted[arch] = root / arch
        assert main(["open_clip", "--arch", arch, "--out", str(converted[arch]), *args[arch]]) == 0
    (root / "vit_b_32.safetensors").unlink()
    (root / "openai_vit_b_32.pt").unlink()
    return SimpleNamespace(upstream=dict(state_dict=state_dict, images=images, prompts=OPEN_CLIP_PROMPTS, ids=ids,
                                         outputs=outputs),
                           converted=converted)
