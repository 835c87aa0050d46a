"""Contrastive image-text losses: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid.

Plain functions of tensors (no model, no data, no distributed code), in the spirit of
open_clip/loss.py. Conventions shared by both losses:

- `image_emb[i]` and `text_emb[i]` are a matching pair of class `labels[i]`: the raw
  projections the encoders return. Both losses L2-normalize every embedding inside
  (batch and extra rows), so callers never normalize.
- `logit_scale` is the learnable *log* temperature t; logits use exp(t), as in CLIP and
  SigLIP. After each optimizer step `clamp_logit_scale_` clamps it under InfoNCE (not under the sigmoid loss).
- Positives: with `labels` (class ids) every pair of the same class is a positive, so a
  row may have several; with `labels=None` only the diagonal pair (i, i) is.
- Extra candidates, rows scored after the batch's own and never anchors: images are scored
  against [batch texts; gathered texts; memory texts] and texts against [batch images; gathered
  images; memory images]. Each set is an (image, text, labels) triple or None:
  `gathered`: rows of this same step from elsewhere, computed by the current weights and
    carrying gradient: other ranks' rows under DDP (har_ref/distributed.py), and in cached
    accumulation the step's other micro-batches (har_ref/train/loop.py::loss_backward_by_blocks).
  `memory`: the cross-batch memory (xbm.py): rows of earlier steps, detached and stale (an older
    model computed them). With same-class positives a memory row of the anchor's own image (the
    memory spans an epoch boundary, or is larger than the training set) is a positive of its
    class like any other same-class row; docs/losses.md, "Cross-batch memory".
  The loss treats both alike (it detaches neither); the names say what the caller hands over.
  Without `labels` every extra row is a negative, and the triples' labels must be None.
- Cost: per direction only a [B, B+N] logit matrix and a [B, B+N] bool positive mask are built
  (N extra rows); the extra block is normalized by dividing its [B, N] logits by the [N] row
  norms instead of copying the [N, D] rows.

Compute the losses in float32 (call them outside autocast, on `.float()` embeddings):
the logits are sums of 32k exponentials.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

Rows = tuple[Tensor, Tensor, "Tensor | None"]  # extra candidates: (images [N, D], texts [N, D], labels [N] or None)

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP sec. 2.5: temperature clipped so logits scale <= 100


def clamp_logit_scale_(logit_scale: Tensor, loss: str) -> Tensor:
    """After each optimizer step: under CLIP's InfoNCE (`loss` "clip") the log temperature is clamped in
    place to [0, ln 100] (CLIP sec. 2.5, as open_clip does); under SigLIP's sigmoid loss it is left alone,
    as big_vision leaves it (`train --clamp-logit-scale none` never clamps).

    Pretrained SigLIP checkpoints end above ln 100 (t ~ 4.72-4.77, exp t ~ 112-117), so CLIP's
    ceiling would cut their temperature at the first step; docs/losses.md has the numbers.
    """
    if loss == "clip":
        with torch.no_grad():
            logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
    return logit_scale


def positive_mask(
    labels: Tensor | None,
    batch_size: int,
    extra_labels: Tensor | None = None,
    extra_size: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Bool [B, B+N]: entry (i, j) is True when candidate j is a positive for anchor i.

    Candidates are [batch; N extra rows (gathered, then memory)]. With labels, positives are
    same-class pairs (the diagonal is always one, since pair i has labels[i]); without, only (i, i) is.
    """
    if labels is None:
        if extra_labels is not None:
            raise ValueError("Extra candidates (gathered or memory rows) came with labels but the batch has "
                             "none; pass the batch class labels too, or no labels for the extra rows.")
        return torch.eye(batch_size, batch_size + extra_size, dtype=torch.bool, device=device)
    if extra_size > 0 and extra_labels is None:
        raise ValueError("Extra candidates (gathered or memory rows) came without labels but the batch has "
                         "labels; pass the extra rows' class labels too.")
    candidate_labels = labels if extra_labels is None else torch.cat([labels, extra_labels.to(labels.device)])
    return labels[:, None] == candidate_labels[None, :]


def balanced_pos_weight(labels: Tensor, *extra_labels: Tensor) -> float:
    """Class-balanced SigLIP positive weight: (#negative pairs) / (#positive pairs) of the [B, B+N] mask.

    With it, positives and negatives carry equal total weight in siglip_loss. `extra_labels`: the
    labels of the extra candidates (the gathered rows', the memory rows'). Counted per class with
    bincount (sum_c n_batch[c] * n_candidates[c] positives), so no mask is built.
    """
    candidate_labels = torch.cat([labels] + [x.to(labels.device) for x in extra_labels])
    num_classes = int(candidate_labels.max()) + 1
    batch_counts = torch.bincount(labels, minlength=num_classes)
    candidate_counts = torch.bincount(candidate_labels, minlength=num_classes)
    num_pairs = labels.numel() * candidate_labels.numel()
    num_positive = int((batch_counts * candidate_counts).sum())
    return (num_pairs - num_positive) / num_positive


def _scaled_cosine_logits(anchors: Tensor, candidates: Tensor, extra: Tensor | None, scale: Tensor) -> Tensor:
    """scale * cos(anchor_i, candidate_j) for candidates [batch; extra rows] -> [B, B+N]."""
    scaled_anchors = F.normalize(anchors, dim=-1) * scale  # scale the [B, D] side, not the [B, B+N] logits
    logits = scaled_anchors @ F.normalize(candidates, dim=-1).T
    if extra is None:
        return logits
    extra = extra.to(anchors.dtype)
    # Same as F.normalize(extra) (x / max(|x|, eps)) without an [N, D] copy: divide the columns.
    # In place: the matmul's backward needs its inputs, not its output, so no [B, N] copy either.
    extra_norms = extra.norm(dim=-1).clamp_min(1e-12)
    return torch.cat([logits, (scaled_anchors @ extra.T).div_(extra_norms)], dim=1)


def extra_rows(gathered: Rows | None, memory: Rows | None) -> Rows | None:
    """The extra candidates as one (images, texts, labels) triple: gathered rows, then memory rows.

    Only when both are given are they concatenated (an [N, D] copy); one is passed through as is.
    """
    parts = [tuple(rows) for rows in (gathered, memory) if rows is not None]
    if len(parts) < 2:
        return parts[0] if parts else None
    (g_image, g_text, g_labels), (m_image, m_text, m_labels) = parts
    if (g_labels is None) != (m_labels is None):
        raise ValueError("Gathered rows and memory rows must both have labels or both have none; "
                         "pass the class labels of both, or of neither.")
    labels = None if g_labels is None else torch.cat([g_labels, m_labels])
    return torch.cat([g_image, m_image]), torch.cat([g_text, m_text]), labels


def _soft_target_cross_entropy(logits: Tensor, positives: Tensor) -> Tensor:
    """Mean over rows of CE with targets uniform over each row's positives (standard CE with one positive)."""
    log_probs = logits.log_softmax(dim=1)
    positive_log_probs = log_probs.masked_fill(~positives, 0.0).sum(dim=1)
    # dtype given: summing bools would first copy the mask to int64, twice a logit matrix's bytes.
    return -(positive_log_probs / positives.sum(dim=1, dtype=logits.dtype)).mean()


def clip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor,
    labels: Tensor | None = None,
    gathered: Rows | None = None,
    memory: Rows | None = None,
) -> Tensor:
    """Symmetric InfoNCE (CLIP paper, Fig. 3 pseudocode), with multi-positive soft targets and extra
    candidates (gathered rows, memory rows: the module docstring says which is which).

    loss = (CE_image->text + CE_text->image) / 2, each CE the mean over the B anchors of that
    direction of  -sum_j q_ij log softmax_j(exp(t) * cos(anchor_i, candidate_j)),  q_ij = 1/|P_i| on
    the positives P_i of anchor i and 0 elsewhere. With one positive per row this is open_clip's ClipLoss.
    The same loss written plainly, the specification the tests hold this one to: `clip_loss_plain`.
    """
    extra_image, extra_text, extra_labels = extra_rows(gathered, memory) or (None, None, None)
    extra_size = 0 if extra_image is None else extra_image.shape[0]
    positives = positive_mask(labels, image_emb.shape[0], extra_labels, extra_size, image_emb.device)
    scale = logit_scale.exp()
    # Same labels on both sides, so one mask serves both directions. One direction at a time:
    # its [B, B+N] logits are freed before the other direction's are built.
    image_to_text = _soft_target_cross_entropy(_scaled_cosine_logits(image_emb, text_emb, extra_text, scale), positives)
    text_to_image = _soft_target_cross_entropy(_scaled_cosine_logits(text_emb, image_emb, extra_image, scale), positives)
    return (image_to_text + text_to_image) / 2


def _sigmoid_loss(logits: Tensor, targets: Tensor, pos_weight: float | None) -> Tensor:
    """SigLIP eq. 1 for one direction: -(1/B) sum_ij w_ij log sigmoid(z_ij * logits_ij).

    With y = (z + 1) / 2 in {0, 1}, -log sigmoid(z * l) is binary cross-entropy with logits
    (-log sigmoid(l) if y = 1, -log(1 - sigmoid(l)) = -log sigmoid(-l) if y = 0), and BCE's
    pos_weight multiplies exactly the y = 1 terms. Faster on the CPU than spelling out z (docs/benchmarks.md).
    """
    weight = None if pos_weight is None else torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    total = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight, reduction="sum")
    return total / logits.shape[0]


def siglip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    labels: Tensor | None = None,
    pos_weight: float | None = None,
    gathered: Rows | None = None,
    memory: Rows | None = None,
) -> Tensor:
    """Pairwise sigmoid loss (SigLIP paper, eq. 1), with multi-positive labels, pos_weight and extra
    candidates (gathered rows, memory rows: the module docstring says which is which).

    Per direction:  -(1/B) sum_i sum_j w_ij log sigmoid(z_ij (exp(t) cos(anchor_i, candidate_j) + b)),
    z_ij = +1 on positives and -1 elsewhere, w_ij = pos_weight on positives (1 if None) and 1 elsewhere.
    B is the number of anchor rows (images or texts of the batch).
    loss = (image->text + text->image) / 2. Without extra rows the two directions are the same sum
    (one logit matrix is the other's transpose), so the loss is exactly eq. 1 with N = B, as in
    open_clip's SigLipLoss and transformers' SiglipModel. With extra rows each batch pair keeps weight
    1/B and each (anchor, extra row) pair gets 1/(2B): it appears in one direction only.
    `balanced_pos_weight(labels, extra_labels)` gives the pos_weight that balances the two classes.
    The same loss written plainly, the specification the tests hold this one to: `siglip_loss_plain`.
    """
    extra_image, extra_text, extra_labels = extra_rows(gathered, memory) or (None, None, None)
    extra_size = 0 if extra_image is None else extra_image.shape[0]
    # y_ij = (z_ij + 1) / 2 as floats, built once: both directions' BCE keep it for their backward.
    targets = positive_mask(labels, image_emb.shape[0], extra_labels, extra_size, image_emb.device).to(image_emb.dtype)
    scale = logit_scale.exp()
    # One direction at a time, so only one [B, B+N] logit matrix is alive at once besides the saved ones.
    image_to_text = _sigmoid_loss(_scaled_cosine_logits(image_emb, text_emb, extra_text, scale) + logit_bias,
                                  targets, pos_weight)
    text_to_image = _sigmoid_loss(_scaled_cosine_logits(text_emb, image_emb, extra_image, scale) + logit_bias,
                                  targets, pos_weight)
    return (image_to_text + text_to_image) / 2


# --- The plain equations ------------------------------------------------------------------------
# The two losses written as the papers write them, in the spirit of big_vision's eight-line
# `loss_fn` (big_vision/trainers/proj/image_text/siglip.py): normalize, build every logit, one line per term.
# They build full [B, B+N] float matrices and copy the extra rows; tests/test_losses.py checks the
# optimized functions above against them (values and gradients, float64).

def _plain_pairs(image_emb, text_emb, labels, gathered, memory):
    """Unit embeddings, unit candidates [batch; gathered; memory] and the [B, B+N] positive mask as floats."""
    extra = [rows for rows in (gathered, memory) if rows is not None]
    if labels is None:  # pair i is its own class; extra rows match nothing
        labels = torch.arange(image_emb.shape[0], device=image_emb.device)
        extra = [(image, text, labels.new_full((len(image),), -1)) for image, text, _ in extra]
    img, txt = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    img_candidates = torch.cat([img] + [F.normalize(image, dim=-1) for image, _, _ in extra])
    txt_candidates = torch.cat([txt] + [F.normalize(text, dim=-1) for _, text, _ in extra])
    candidate_labels = torch.cat([labels] + [extra_labels for _, _, extra_labels in extra])
    positives = (labels[:, None] == candidate_labels[None, :]).to(img.dtype)
    return img, txt, img_candidates, txt_candidates, positives


def clip_loss_plain(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, labels: Tensor | None = None,
                    gathered: Rows | None = None, memory: Rows | None = None) -> Tensor:
    """Symmetric InfoNCE (CLIP paper, Fig. 3), targets uniform over each row's positives: `clip_loss`, plainly."""
    img, txt, img_candidates, txt_candidates, positives = _plain_pairs(image_emb, text_emb, labels, gathered, memory)
    targets = positives / positives.sum(dim=1, keepdim=True)
    logits_per_image = logit_scale.exp() * img @ txt_candidates.T
    logits_per_text = logit_scale.exp() * txt @ img_candidates.T
    loss_image = -(targets * logits_per_image.log_softmax(dim=1)).sum(dim=1).mean()
    loss_text = -(targets * logits_per_text.log_softmax(dim=1)).sum(dim=1).mean()
    return (loss_image + loss_text) / 2


def siglip_loss_plain(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                      labels: Tensor | None = None, pos_weight: float | None = None,
                      gathered: Rows | None = None, memory: Rows | None = None) -> Tensor:
    """SigLIP eq. 1, -1/n sum_ij w_ij log sigmoid(z_ij (t x_i . y_j + b)), both ways: `siglip_loss`, plainly."""
    n = image_emb.shape[0]
    zimg, ztxt, img_candidates, txt_candidates, positives = _plain_pairs(image_emb, text_emb, labels, gathered, memory)
    z = 2 * positives - 1  # +1 on positives, -1 elsewhere (big_vision: 2 * eye(n) - 1)
    weights = 1 + ((pos_weight or 1.0) - 1) * positives  # pos_weight on positives, 1 elsewhere
    logits_per_image = logit_scale.exp() * zimg @ txt_candidates.T + logit_bias
    logits_per_text = logit_scale.exp() * ztxt @ img_candidates.T + logit_bias
    loss_image = -(weights * F.logsigmoid(z * logits_per_image)).sum() / n
    loss_text = -(weights * F.logsigmoid(z * logits_per_text)).sum() / n
    return (loss_image + loss_text) / 2


def positive_share(batches: list[list[int]]) -> float:
    """The share of positive (same-class) pairs among the anchor-candidate pairs of these batches
    (labels per micro-batch; each batch scored against itself, as the sigmoid loss does)."""
    positive = sum(int((torch.bincount(torch.as_tensor(b)) ** 2).sum()) for b in batches)
    return positive / sum(len(b) ** 2 for b in batches)


def logit_bias_for(share: float) -> float:
    """b with sigmoid(b) = share: the level every logit starts at when cosines are ~0 (docs/losses.md,
    "Where b starts"; open_clip issue #650 sets b from the batch size, the one-positive case of this)."""
    return math.log(share / (1.0 - share))
