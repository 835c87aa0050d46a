"""Shared test plumbing: measured differences are printed in the summary of every run.

Tests call `measured("...")` with what they found (e.g. the max |difference| against upstream),
so `make test` shows the numbers, not only that they were within tolerance.
"""
from __future__ import annotations

import pytest

_MEASURED: list[str] = []


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
    from har_ref.demo.demo import make_tiny_checkpoint
    from har_ref.demo.synthetic import CLASS_NAMES

    texts, _ = PromptBank.from_file(None, list(CLASS_NAMES)).all_prompts()
    root = tmp_path_factory.mktemp("tiny_weights")
    return {family: make_tiny_checkpoint(family, texts, root / family, seed=0) for family in ("clip", "siglip")}
