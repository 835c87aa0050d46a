"""Losses: the plain equations (losses.py's `*_plain`) are the specification of the optimized ones.

The plain functions are checked against the definitions written out one pair at a time; the
optimized `clip_loss` and `siglip_loss` against the plain ones, values and gradients in float64;
then gradcheck, and parity with open_clip and transformers."""
import math

import pytest
import torch
import torch.nn.functional as F

from allocations import tensor_allocations
from har_ref.train.losses import (balanced_pos_weight, clamp_logit_scale_, clip_loss, clip_loss_plain,
                                  positive_mask, siglip_loss, siglip_loss_plain)

pytestmark = pytest.mark.usefixtures("one_thread")


B, M, D = 6, 5, 4
LABELS = torch.tensor([0, 2, 0, 1, 2, 0])  # repeated classes: several positives per row
MEMORY_LABELS = torch.tensor([1, 0, 3, 2, 0])  # class 3 has no batch row


def make_inputs(seed: int = 0, memory: bool = True):
    g = torch.Generator().manual_seed(seed)
    tensors = dict(
        image=torch.randn(B, D, generator=g, dtype=torch.float64),
        text=torch.randn(B, D, generator=g, dtype=torch.float64),
        scale=torch.tensor(1.3, dtype=torch.float64),
        bias=torch.tensor(-0.7, dtype=torch.float64),
    )
    if memory:
        tensors["memory_image"] = torch.randn(M, D, generator=g, dtype=torch.float64)
        tensors["memory_text"] = torch.randn(M, D, generator=g, dtype=torch.float64)
    return tensors


# --- per-pair python reference (the definitions written out one pair at a time) ---------------

def cosine(a, b):
    return (a @ b) / (a.norm() * b.norm())


def reference_pairs(anchors, batch_candidates, memory_candidates, labels, memory_labels):
    """Yield (i, [(logit-free cosine, is_positive) for every candidate]) for each anchor row."""
    n = anchors.shape[0]
    anchor_labels = list(range(n)) if labels is None else labels.tolist()
    candidates = list(batch_candidates) + ([] if memory_candidates is None else list(memory_candidates))
    if labels is None:  # diagonal positives; memory rows never match
        candidate_labels = list(range(n)) + [-1] * (len(candidates) - n)
    else:
        candidate_labels = labels.tolist() + ([] if memory_labels is None else memory_labels.tolist())
    for i in range(n):
        yield [(cosine(anchors[i], c), anchor_labels[i] == cl) for c, cl in zip(candidates, candidate_labels)]


def concatenated_extra_rows(gathered, memory):
    """The extra candidates [gathered; memory] as (images, texts, labels); three Nones without any."""
    parts = [rows for rows in (gathered, memory) if rows is not None]
    if not parts:
        return None, None, None
    labels = None if parts[0][2] is None else torch.cat([rows[2] for rows in parts])
    return torch.cat([rows[0] for rows in parts]), torch.cat([rows[1] for rows in parts]), labels


def naive_clip_loss(image, text, scale, labels=None, gathered=None, memory=None):
    memory_image, memory_text, memory_labels = concatenated_extra_rows(gathered, memory)
    directions = [(image, text, memory_text), (text, image, memory_image)]
    total = 0.0
    for anchors, candidates, memory in directions:
        direction_loss = 0.0
        for row in reference_pairs(anchors, candidates, memory, labels, memory_labels):
            logits = [scale.exp() * cos for cos, _ in row]
            log_normalizer = torch.logsumexp(torch.stack(logits), dim=0)
            positives = [logit for logit, (_, positive) in zip(logits, row) if positive]
            direction_loss += -sum(p - log_normalizer for p in positives) / len(positives)
        total += direction_loss / anchors.shape[0]
    return total / 2


def naive_siglip_loss(image, text, scale, bias, labels=None, pos_weight=None, gathered=None, memory=None):
    memory_image, memory_text, memory_labels = concatenated_extra_rows(gathered, memory)
    directions = [(image, text, memory_text), (text, image, memory_image)]
    total = 0.0
    for anchors, candidates, memory in directions:
        direction_loss = 0.0
        for row in reference_pairs(anchors, candidates, memory, labels, memory_labels):
            for cos, positive in row:
                logit = scale.exp() * cos + bias
                z, weight = (1.0, pos_weight or 1.0) if positive else (-1.0, 1.0)
                direction_loss += -weight * F.logsigmoid(z * logit)
        total += direction_loss / anchors.shape[0]
    return total / 2


# --- the plain equations against the per-pair definitions --------------------------------------

CASES = [(labels, memory) for labels in (None, LABELS) for memory in (False, True)]
CASE_IDS = [f"{'classes' if labels is not None else 'diagonal'}-{'memory' if memory else 'batch'}"
            for labels, memory in CASES]


def case_arguments(labels, memory, requires_grad=False):
    """(tensors, keyword arguments for the extra candidates) of one case; the tensors are float64 leaves.
    With memory, the M extra rows go in as 2 gathered rows and 3 memory rows."""
    x = {k: v.requires_grad_(requires_grad) for k, v in make_inputs(memory=memory).items()}
    if not memory:
        return x, {}
    extra_labels = MEMORY_LABELS if labels is not None else None

    def rows(part):
        return x["memory_image"][part], x["memory_text"][part], None if extra_labels is None else extra_labels[part]
    return x, dict(gathered=rows(slice(0, 2)), memory=rows(slice(2, None)))


@pytest.mark.parametrize("labels, memory", CASES, ids=CASE_IDS)
def test_clip_loss_plain_matches_per_pair_reference(labels, memory):
    x, kwargs = case_arguments(labels, memory)
    got = clip_loss_plain(x["image"], x["text"], x["scale"], labels, **kwargs)
    want = naive_clip_loss(x["image"], x["text"], x["scale"], labels, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("labels, memory", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("pos_weight", [None, 3.5], ids=["unweighted", "pos_weight"])
def test_siglip_loss_plain_matches_per_pair_reference(labels, memory, pos_weight):
    x, kwargs = case_arguments(labels, memory)
    got = siglip_loss_plain(x["image"], x["text"], x["scale"], x["bias"], labels, pos_weight, **kwargs)
    want = naive_siglip_loss(x["image"], x["text"], x["scale"], x["bias"], labels, pos_weight, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --- the optimized losses against the plain ones: values and gradients ----------------------------

def assert_same_value_and_gradients(optimized, plain, x):
    got, want = optimized(), plain()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    inputs = list(x.values())
    for name, g, w in zip(x, torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("labels, memory", CASES, ids=CASE_IDS)
def test_clip_loss_matches_plain_equation(labels, memory):
    x, kwargs = case_arguments(labels, memory, requires_grad=True)
    x.pop("bias")  # CLIP has none
    assert_same_value_and_gradients(lambda: clip_loss(x["image"], x["text"], x["scale"], labels, **kwargs),
                                    lambda: clip_loss_plain(x["image"], x["text"], x["scale"], labels, **kwargs), x)


@pytest.mark.parametrize("labels, memory", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("pos_weight", [None, 3.5], ids=["unweighted", "pos_weight"])
def test_siglip_loss_matches_plain_equation(labels, memory, pos_weight):
    x, kwargs = case_arguments(labels, memory, requires_grad=True)
    args = (x["image"], x["text"], x["scale"], x["bias"], labels, pos_weight)
    assert_same_value_and_gradients(lambda: siglip_loss(*args, **kwargs), lambda: siglip_loss_plain(*args, **kwargs), x)


def test_one_positive_per_row_labels_equal_diagonal():
    x = make_inputs()
    unique = torch.arange(B)
    memory_unique = torch.arange(B, B + M)  # no memory row shares a class with the batch
    labelled = (x["memory_image"], x["memory_text"], memory_unique)
    unlabelled = (x["memory_image"], x["memory_text"], None)
    torch.testing.assert_close(
        clip_loss(x["image"], x["text"], x["scale"], unique, memory=labelled),
        clip_loss(x["image"], x["text"], x["scale"], memory=unlabelled), rtol=1e-14, atol=0)
    torch.testing.assert_close(
        siglip_loss(x["image"], x["text"], x["scale"], x["bias"], unique, memory=labelled),
        siglip_loss(x["image"], x["text"], x["scale"], x["bias"], memory=unlabelled), rtol=1e-14, atol=0)


def test_positive_mask_and_balanced_pos_weight():
    mask = positive_mask(LABELS, B, MEMORY_LABELS, M)
    candidates = LABELS.tolist() + MEMORY_LABELS.tolist()
    want = torch.tensor([[a == c for c in candidates] for a in LABELS.tolist()])
    assert mask.shape == (B, B + M) and mask.dtype == torch.bool and torch.equal(mask, want)
    assert torch.equal(positive_mask(None, 3, None, 2), torch.tensor([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0],
                                                                      [0, 0, 1, 0, 0]], dtype=torch.bool))
    # class counts: batch {0: 3, 1: 1, 2: 2}, memory {0: 2, 1: 1, 2: 1, 3: 1}
    # positives: batch block 3*3 + 1*1 + 2*2 = 14, against memory 3*2 + 1*1 + 2*1 = 9; 23 of 66 pairs
    assert int(want.sum()) == 23
    assert balanced_pos_weight(LABELS, MEMORY_LABELS) == pytest.approx((66 - 23) / 23, rel=1e-15)
    assert balanced_pos_weight(LABELS) == pytest.approx((36 - 14) / 14, rel=1e-15)


def test_balanced_pos_weight_balances_total_weight():
    # With pos_weight = #neg/#pos, positives and negatives carry the same total weight.
    w = balanced_pos_weight(LABELS, MEMORY_LABELS)
    mask = positive_mask(LABELS, B, MEMORY_LABELS, M)
    assert w * mask.sum().item() == pytest.approx((~mask).sum().item(), rel=1e-15)


# --- gradients --------------------------------------------------------------------------------

@pytest.mark.parametrize("labels", [None, LABELS], ids=["diagonal", "classes"])
@pytest.mark.parametrize("memory", [False, True], ids=["batch", "memory"])
def test_clip_loss_gradcheck(labels, memory):
    x = {k: v.requires_grad_() for k, v in make_inputs(memory=memory).items() if k != "bias"}
    memory_labels = MEMORY_LABELS if (memory and labels is not None) else None
    # image, text, scale[, memory_image, memory_text]: extra rows with gradient, as DDP's gathered rows
    names = list(x)

    def f(*args):
        a = dict(zip(names, args))
        gathered = (a["memory_image"], a["memory_text"], memory_labels) if memory else None
        return clip_loss(a["image"], a["text"], a["scale"], labels, gathered)

    assert torch.autograd.gradcheck(f, tuple(x.values()))


@pytest.mark.parametrize("labels", [None, LABELS], ids=["diagonal", "classes"])
@pytest.mark.parametrize("memory", [False, True], ids=["batch", "memory"])
@pytest.mark.parametrize("pos_weight", [None, 3.5], ids=["unweighted", "pos_weight"])
def test_siglip_loss_gradcheck(labels, memory, pos_weight):
    x = {k: v.requires_grad_() for k, v in make_inputs(memory=memory).items()}
    memory_labels = MEMORY_LABELS if (memory and labels is not None) else None
    names = list(x)

    def f(*args):
        a = dict(zip(names, args))
        gathered = (a["memory_image"], a["memory_text"], memory_labels) if memory else None
        return siglip_loss(a["image"], a["text"], a["scale"], a["bias"], labels, pos_weight, gathered)

    assert torch.autograd.gradcheck(f, tuple(x.values()))


def test_clamp_logit_scale_in_place():
    scale = torch.nn.Parameter(torch.tensor(5.0))
    pointer = scale.data_ptr()
    clamp_logit_scale_(scale, "clip")
    assert scale.item() == pytest.approx(math.log(100)) and scale.data_ptr() == pointer and scale.requires_grad
    scale.data.fill_(-1.0)
    clamp_logit_scale_(scale, "clip")
    assert scale.item() == 0.0


@pytest.mark.parametrize("family, expected", [("siglip", 4.765), ("clip", math.log(100))])
def test_optimizer_step_keeps_siglip_temperature(family, expected):
    """A pretrained SigLIP t = 4.765 (exp t ~ 117) survives a step whose gradient on t is zero;
    CLIP's t above ln 100 is still clamped (CLIP sec. 2.5)."""
    scale = torch.nn.Parameter(torch.tensor(4.765))
    optimizer = torch.optim.AdamW([scale], lr=1e-3, weight_decay=0.0)
    scale.grad = torch.zeros(())
    optimizer.step()
    clamp_logit_scale_(scale, family)
    assert scale.item() == pytest.approx(expected, abs=1e-6)


def test_inconsistent_memory_arguments_raise():
    x = make_inputs()
    with pytest.raises(ValueError, match="came with labels but the batch has none"):
        clip_loss(x["image"], x["text"], x["scale"], None, memory=(x["memory_image"], x["memory_text"], MEMORY_LABELS))
    with pytest.raises(ValueError, match="came without labels but the batch has labels"):
        clip_loss(x["image"], x["text"], x["scale"], LABELS, memory=(x["memory_image"], x["memory_text"], None))
    with pytest.raises(ValueError, match="both have labels or both have none"):
        siglip_loss(x["image"], x["text"], x["scale"], x["bias"], LABELS,
                    gathered=(x["memory_image"], x["memory_text"], MEMORY_LABELS),
                    memory=(x["memory_image"], x["memory_text"], None))


# --- parity with upstream in the one-positive case ----------------------------------------------

def test_clip_loss_matches_open_clip_values_and_gradients():
    from open_clip.loss import ClipLoss

    ours = {k: v.requires_grad_() for k, v in make_inputs(memory=False).items() if k != "bias"}
    theirs = {k: v.detach().clone().requires_grad_() for k, v in ours.items()}
    loss = clip_loss(ours["image"], ours["text"], ours["scale"])
    # open_clip takes already-normalized features and the already-exponentiated scale.
    upstream = ClipLoss()(F.normalize(theirs["image"], dim=-1), F.normalize(theirs["text"], dim=-1),
                          theirs["scale"].exp())
    torch.testing.assert_close(loss, upstream, rtol=1e-13, atol=0)
    loss.backward(), upstream.backward()
    for name in ours:
        torch.testing.assert_close(ours[name].grad, theirs[name].grad, rtol=1e-11, atol=1e-13)


def test_siglip_loss_matches_open_clip_values_and_gradients():
    from open_clip.loss import SigLipLoss

    ours = {k: v.requires_grad_() for k, v in make_inputs(memory=False).items()}
    theirs = {k: v.detach().clone().requires_grad_() for k, v in ours.items()}
    loss = siglip_loss(ours["image"], ours["text"], ours["scale"], ours["bias"])
    upstream = SigLipLoss()(F.normalize(theirs["image"], dim=-1), F.normalize(theirs["text"], dim=-1),
                            theirs["scale"].exp(), theirs["bias"])
    torch.testing.assert_close(loss, upstream, rtol=1e-13, atol=0)
    loss.backward(), upstream.backward()
    for name in ours:
        torch.testing.assert_close(ours[name].grad, theirs[name].grad, rtol=1e-11, atol=1e-13)


def test_siglip_loss_matches_transformers_siglip_model():
    # transformers: loss = mean over texts of -sum over images of logsigmoid(z * logits_per_text),
    # i.e. the sum over all N^2 pairs divided by N (batch size): SigLIP eq. 1, same as ours.
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    config = SiglipConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=2),
    )
    model = SiglipModel(config).double().eval()
    with torch.no_grad():  # the post-init values (0, 0) would make the check weak
        model.logit_scale.fill_(1.7)
        model.logit_bias.fill_(-2.5)
    out = model(input_ids=torch.randint(0, 99, (5, 16)), pixel_values=torch.randn(5, 3, 32, 32, dtype=torch.float64),
                return_loss=True)
    ours = siglip_loss(out.image_embeds, out.text_embeds, model.logit_scale, model.logit_bias)
    torch.testing.assert_close(ours, out.loss, rtol=1e-13, atol=0)


def test_clip_loss_matches_transformers_clip_model():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16,
    )
    model = CLIPModel(config).double().eval()
    out = model(input_ids=torch.randint(0, 99, (5, 16)), pixel_values=torch.randn(5, 3, 32, 32, dtype=torch.float64),
                return_loss=True)
    ours = clip_loss(out.image_embeds, out.text_embeds, model.logit_scale)
    torch.testing.assert_close(ours, out.loss, rtol=1e-13, atol=0)


# Peak live bytes of forward + backward, in [B, B+M] float matrices. Measured (torch 2.14.1): CLIP 5.57
# (two saved log-softmax outputs + one direction's transients), SigLIP 6.82 (two saved logit matrices,
# the shared float targets, BCE's transients). Building both directions' logits before either loss, or
# one float target per direction, measured 6.57 and 7.82: the bounds catch that.
PEAK_LOGIT_MATRICES = {"clip": 6.0, "siglip": 7.25}


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_loss_with_memory_never_materializes_more_than_one_logit_matrix_at_a_time(loss, measured):
    """Batch 32 against 2,000 memory rows of width 256: an [M, D] copy of the memory (normalizing it)
    would be 4x one [B, B+M] float logit matrix, an int64 copy of the positive mask 2x: the largest
    allocation catches both. The peak catches holding more [B, B+M] matrices than needed."""
    b, m, d = 32, 2000, 256
    g = torch.Generator().manual_seed(0)
    image, text = (torch.randn(b, d, generator=g, requires_grad=True) for _ in range(2))
    memory_image, memory_text = torch.randn(m, d, generator=g), torch.randn(m, d, generator=g)  # detached, as XBM's
    labels, memory_labels = torch.randint(0, 15, (b,), generator=g), torch.randint(0, 15, (m,), generator=g)
    scale, bias = torch.tensor(2.3, requires_grad=True), torch.tensor(-10.0, requires_grad=True)

    def step():
        if loss == "clip":
            value = clip_loss(image, text, scale, labels, memory=(memory_image, memory_text, memory_labels))
        else:
            value = siglip_loss(image, text, scale, bias, labels, balanced_pos_weight(labels, memory_labels),
                                memory=(memory_image, memory_text, memory_labels))
        value.backward()

    step()  # first-use allocations of the process are not the loss's
    largest, peak = tensor_allocations(step)
    logit_matrix = b * (b + m) * 4
    measured(f"loss memory {loss}: B {b}, M {m}, D {d}: largest allocation {largest / logit_matrix:.2f} and peak "
             f"{peak / logit_matrix:.2f} [B, B+M] float matrices")
    assert largest <= logit_matrix
    assert peak <= PEAK_LOGIT_MATRICES[loss] * logit_matrix
