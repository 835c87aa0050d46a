"""WiSE-FT: theta(alpha) = (1 - alpha) theta_zero_shot + alpha theta_fine_tuned, written as a checkpoint."""
from __future__ import annotations

import shutil

import pytest
import torch

from har_ref.__main__ import main
from har_ref.model.dual_encoder import load_model, save_model
from har_ref.eval.wise_ft import interpolate


@pytest.fixture(params=["clip", "siglip"])
def pair(request, tiny_weights, tmp_path):
    """(zero-shot dir, fine-tuned dir): the tiny checkpoint and a copy with every tensor moved."""
    zero_shot = tiny_weights[request.param]
    fine_tuned = tmp_path / "fine_tuned"
    shutil.copytree(zero_shot, fine_tuned)
    model = load_model(zero_shot)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    save_model(model, fine_tuned)
    return zero_shot, fine_tuned


def state(directory):
    return load_model(directory).state_dict()


def test_alpha_zero_and_one_are_the_endpoints_exactly_and_half_is_the_midpoint(pair, tmp_path):
    zero_shot, fine_tuned = pair
    for alpha, expected in [(0, state(zero_shot)), (1, state(fine_tuned))]:
        out = tmp_path / f"alpha{alpha}"
        assert main(["wise-ft", "--zero-shot", str(zero_shot), "--fine-tuned", str(fine_tuned),
                     "--alpha", str(alpha), "--out", str(out)]) == 0
        got = state(out)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    a, b = state(zero_shot), state(fine_tuned)
    half = interpolate(load_model(zero_shot), load_model(fine_tuned), 0.5).state_dict()
    for k in a:
        torch.testing.assert_close(half[k], (a[k] + b[k]) / 2, rtol=0, atol=1e-6)


def test_bad_alpha_and_mismatched_checkpoints_are_one_sentence(pair, tiny_weights, tmp_path, capsys):
    zero_shot, fine_tuned = pair
    assert main(["wise-ft", "--zero-shot", str(zero_shot), "--fine-tuned", str(fine_tuned), "--alpha", "1.5",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--alpha must be between 0" in capsys.readouterr().err
    other = tiny_weights["siglip" if load_model(zero_shot).cfg.family == "clip" else "clip"]
    assert main(["wise-ft", "--zero-shot", str(other), "--fine-tuned", str(fine_tuned), "--alpha", "0.5",
                 "--out", str(tmp_path / "y")]) == 2
    assert "different config.json" in capsys.readouterr().err
