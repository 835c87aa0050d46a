"""Contrastive image-text losses: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid.

Plain functions of tensors (no model, no data, no distributed code), in the spirit of
open_clip/loss.py. Conventions shared by both losses:

- `image_emb[i]` and `text_emb[i]` are a matching pair of class `labels[i]`: the raw
  projections the encoders return. Both losses L2-normalize every embedding inside
  (batch and memory), so callers never normalize.
- `logit_scale` is the learnable *log* temperature t; logits use exp(t), as in CLIP and
  SigLIP. After each optimizer step `clamp_logit_scale_` clamps CLIP's (SigLIP's is not clamped).
- Positives: with `labels` (class ids) every pair of the same class is a positive, so a
  row may have several; with `labels=None` only the diagonal pair (i, i) is.
- Memory (`memory_image`, `memory_text`, `memory_labels`): extra *candidates* appended
  after the batch: images are scored against [batch texts; memory texts] and texts
  against [batch images; memory images]. Memory rows are never anchors. The loss does not
  detach them: cross-batch memory (xbm.py) hands over detached tensors, while under DDP
  the rows of other ranks can be passed here with their gradient (distributed.py).
  Without `labels`, memory rows are all negatives (and `memory_labels` must be None).
- Cost: per direction only a [B, B+M] logit matrix and a [B, B+M] bool positive mask
  are built; the memory block is normalized by dividing its [B, M] logits by the [M]
  memory norms instead of copying the [M, D] memory.

Compute the losses in float32 (call them outside autocast, on `.float()` embeddings):
the logits are sums of 32k exponentials.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP sec. 2.5: temperature clipped so logits scale <= 100


def clamp_logit_scale_(logit_scale: Tensor, family: str) -> Tensor:
    """After each optimizer step: CLIP's log temperature is clamped in place to [0, ln 100]
    (CLIP sec. 2.5, as open_clip does); SigLIP's is left alone, as big_vision leaves it.

    Pretrained SigLIP checkpoints end above ln 100 (t ~ 4.72-4.77, exp t ~ 112-117), so CLIP's
    ceiling would cut their temperature at the first step; docs/losses.md has the numbers.
    """
    if family == "clip":
        with torch.no_grad():
            logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
    return logit_scale


def positive_mask(
    labels: Tensor | None,
    batch_size: int,
    memory_labels: Tensor | None = None,
    memory_size: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Bool [B, B+M]: entry (i, j) is True when candidate j is a positive for anchor i.

    Candidates are [batch; memory]. With labels, positives are same-class pairs (the diagonal
    is always one, since pair i has labels[i]); without, only (i, i) is.
    """
    if labels is None:
        if memory_labels is not None:
            raise ValueError("memory_labels were given without labels; pass the batch class labels too.")
        return torch.eye(batch_size, batch_size + memory_size, dtype=torch.bool, device=device)
    if memory_size > 0 and memory_labels is None:
        raise ValueError("Memory embeddings were given with batch labels but no memory_labels; pass memory_labels.")
    candidate_labels = labels if memory_labels is None else torch.cat([labels, memory_labels.to(labels.device)])
    return labels[:, None] == candidate_labels[None, :]


def balanced_pos_weight(labels: Tensor, memory_labels: Tensor | None = None) -> float:
    """Class-balanced SigLIP positive weight: (#negative pairs) / (#positive pairs) of the [B, B+M] mask.

    With it, positives and negatives carry equal total weight in siglip_loss. Counted per class
    with bincount (sum_c n_batch[c] * n_candidates[c] positives), so no mask is built.
    """
    candidate_labels = labels if memory_labels is None else torch.cat([labels, memory_labels.to(labels.device)])
    num_classes = int(candidate_labels.max()) + 1
    batch_counts = torch.bincount(labels, minlength=num_classes)
    candidate_counts = torch.bincount(candidate_labels, minlength=num_classes)
    num_pairs = labels.numel() * candidate_labels.numel()
    num_positive = int((batch_counts * candidate_counts).sum())
    return (num_pairs - num_positive) / num_positive


def _scaled_cosine_logits(anchors: Tensor, candidates: Tensor, memory: Tensor | None, scale: Tensor) -> Tensor:
    """scale * cos(anchor_i, candidate_j) for candidates [batch; memory] -> [B, B+M]."""
    scaled_anchors = F.normalize(anchors, dim=-1) * scale  # scale the [B, D] side, not the [B, B+M] logits
    logits = scaled_anchors @ F.normalize(candidates, dim=-1).T
    if memory is None:
        return logits
    memory = memory.to(anchors.dtype)
    # Same as F.normalize(memory) (x / max(|x|, eps)) without an [M, D] copy: divide the columns.
    # In place: the matmul's backward needs its inputs, not its output, so no [B, M] copy either.
    memory_norms = memory.norm(dim=-1).clamp_min(1e-12)
    return torch.cat([logits, (scaled_anchors @ memory.T).div_(memory_norms)], dim=1)


def _check_memory(memory_image: Tensor | None, memory_text: Tensor | None) -> int:
    if (memory_image is None) != (memory_text is None):
        raise ValueError("Only one of memory_image / memory_text was given; pass both or neither.")
    return 0 if memory_image is None else memory_image.shape[0]


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
    memory_image: Tensor | None = None,
    memory_text: Tensor | None = None,
    memory_labels: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE (CLIP paper, Fig. 3 pseudocode), with multi-positive soft targets and memory.

    loss = (CE_image->text + CE_text->image) / 2, each CE the mean over the B anchors of that
    direction of  -sum_j q_ij log softmax_j(exp(t) * cos(anchor_i, candidate_j)),  q_ij = 1/|P_i| on
    the positives P_i of anchor i and 0 elsewhere. With one positive per row this is open_clip's ClipLoss.
    The same loss written plainly, the specification the tests hold this one to: `clip_loss_plain`.
    """
    memory_size = _check_memory(memory_image, memory_text)
    positives = positive_mask(labels, image_emb.shape[0], memory_labels, memory_size, image_emb.device)
    scale = logit_scale.exp()
    # Same labels on both sides, so one mask serves both directions. One direction at a time:
    # its [B, B+M] logits are freed before the other direction's are built.
    image_to_text = _soft_target_cross_entropy(_scaled_cosine_logits(image_emb, text_emb, memory_text, scale), positives)
    text_to_image = _soft_target_cross_entropy(_scaled_cosine_logits(text_emb, image_emb, memory_image, scale), positives)
    return (image_to_text + text_to_image) / 2


def _sigmoid_loss(logits: Tensor, targets: Tensor, pos_weight: float | None) -> Tensor:
    """SigLIP eq. 1 for one direction: -(1/B) sum_ij w_ij log sigmoid(z_ij * logits_ij).

    With y = (z + 1) / 2 in {0, 1}, -log sigmoid(z * l) is binary cross-entropy with logits
    (-log sigmoid(l) if y = 1, -log(1 - sigmoid(l)) = -log sigmoid(-l) if y = 0), and BCE's
    pos_weight multiplies exactly the y = 1 terms. About twice as fast on CPU as spelling out z.
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
    memory_image: Tensor | None = None,
    memory_text: Tensor | None = None,
    memory_labels: Tensor | None = None,
) -> Tensor:
    """Pairwise sigmoid loss (SigLIP paper, eq. 1), with multi-positive labels, pos_weight and memory.

    Per direction:  -(1/B) sum_i sum_j w_ij log sigmoid(z_ij (exp(t) cos(anchor_i, candidate_j) + b)),
    z_ij = +1 on positives and -1 elsewhere, w_ij = pos_weight on positives (1 if None) and 1 elsewhere.
    B is the number of anchor rows (images or texts of the batch).
    loss = (image->text + text->image) / 2. Without memory the two directions are the same sum
    (one logit matrix is the other's transpose), so the loss is exactly eq. 1 with N = B, as in
    open_clip's SigLipLoss and transformers' SiglipModel. With memory each batch pair keeps weight
    1/B and each (anchor, memory) pair gets 1/(2B): it appears in one direction only.
    `balanced_pos_weight(labels, memory_labels)` gives the pos_weight that balances the two classes.
    The same loss written plainly, the specification the tests hold this one to: `siglip_loss_plain`.
    """
    memory_size = _check_memory(memory_image, memory_text)
    # y_ij = (z_ij + 1) / 2 as floats, built once: both directions' BCE keep it for their backward.
    targets = positive_mask(labels, image_emb.shape[0], memory_labels, memory_size, image_emb.device).to(image_emb.dtype)
    scale = logit_scale.exp()
    # One direction at a time, so only one [B, B+M] logit matrix is alive at once besides the saved ones.
    image_to_text = _sigmoid_loss(_scaled_cosine_logits(image_emb, text_emb, memory_text, scale) + logit_bias,
                                  targets, pos_weight)
    text_to_image = _sigmoid_loss(_scaled_cosine_logits(text_emb, image_emb, memory_image, scale) + logit_bias,
                                  targets, pos_weight)
    return (image_to_text + text_to_image) / 2


# --- The plain equations ------------------------------------------------------------------------
# The two losses written as the papers write them, in the spirit of big_vision's eight-line
# `loss_fn` (big_vision/trainers/proj/image_text/siglip.py): normalize, build every logit, one line per term.
# They build full [B, B+M] float matrices and copy the memory; tests/test_losses.py checks the
# optimized functions above against them (values and gradients, float64).

def _plain_pairs(image_emb, text_emb, labels, memory_image, memory_text, memory_labels):
    """Unit embeddings, unit candidates [batch; memory] and the [B, B+M] positive mask as floats."""
    if labels is None:  # pair i is its own class; memory rows match nothing
        labels = torch.arange(image_emb.shape[0], device=image_emb.device)
        memory_labels = None if memory_image is None else labels.new_full((len(memory_image),), -1)
    img, txt = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    img_candidates, txt_candidates, candidate_labels = img, txt, labels
    if memory_image is not None:
        img_candidates = torch.cat([img, F.normalize(memory_image, dim=-1)])
        txt_candidates = torch.cat([txt, F.normalize(memory_text, dim=-1)])
        candidate_labels = torch.cat([labels, memory_labels])
    positives = (labels[:, None] == candidate_labels[None, :]).to(img.dtype)
    return img, txt, img_candidates, txt_candidates, positives


def clip_loss_plain(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, labels: Tensor | None = None,
                    memory_image: Tensor | None = None, memory_text: Tensor | None = None,
                    memory_labels: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE (CLIP paper, Fig. 3), targets uniform over each row's positives: `clip_loss`, plainly."""
    img, txt, img_candidates, txt_candidates, positives = _plain_pairs(
        image_emb, text_emb, labels, memory_image, memory_text, memory_labels)
    targets = positives / positives.sum(dim=1, keepdim=True)
    logits_per_image = logit_scale.exp() * img @ txt_candidates.T
    logits_per_text = logit_scale.exp() * txt @ img_candidates.T
    loss_image = -(targets * logits_per_image.log_softmax(dim=1)).sum(dim=1).mean()
    loss_text = -(targets * logits_per_text.log_softmax(dim=1)).sum(dim=1).mean()
    return (loss_image + loss_text) / 2


def siglip_loss_plain(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                      labels: Tensor | None = None, pos_weight: float | None = None,
                      memory_image: Tensor | None = None, memory_text: Tensor | None = None,
                      memory_labels: Tensor | None = None) -> Tensor:
    """SigLIP eq. 1, -1/n sum_ij w_ij log sigmoid(z_ij (t x_i . y_j + b)), both ways: `siglip_loss`, plainly."""
    n = image_emb.shape[0]
    zimg, ztxt, img_candidates, txt_candidates, positives = _plain_pairs(
        image_emb, text_emb, labels, memory_image, memory_text, memory_labels)
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
