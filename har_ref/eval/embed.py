"""Images and texts to unit vectors, for everything that classifies: evaluate, predict, prompt ablation.

Classification is image-text matching (CLIP sec. 3.1.2): embed the images, embed each class's prompts,
and score every pair with the model's own logit, `DualEncoder.score` (exp(t) * cos, + b for SigLIP).
The three callers share these functions, so a prediction cannot drift from an evaluation.

Text is encoded without an attention mask: SigLIP was trained attending to its padding, and CLIP's
causal tower pools at the end token, before any padding, so this is how upstream encodes text.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.prompts import PromptBank
from ..model.dual_encoder import DualEncoder


@torch.no_grad()
def embed_images(model: DualEncoder, loader, autocast: torch.autocast | None = None
                 ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(unit embeddings [N, D] float32, labels [N], dataset indices [N]) over a loader of (pixels, label, index)."""
    device = model.logit_scale.device
    embs, labels, indices = [], [], []
    for pixels, label, index in loader:
        with autocast or torch.autocast(device.type, enabled=False):
            image = model.encode_image(pixels.to(device, non_blocking=True))
        embs.append(F.normalize(image.float(), dim=-1))
        labels.append(torch.as_tensor(label))
        indices.append(torch.as_tensor(index))
    return torch.cat(embs), torch.cat(labels).numpy(), torch.cat(indices).numpy()


@torch.no_grad()
def embed_texts(model: DualEncoder, tokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Unit embedding [T, D] of every text on its own."""
    device = model.logit_scale.device
    return torch.cat([F.normalize(model.encode_text(tokenizer(texts[i:i + batch_size])[0].to(device)).float(), dim=-1)
                      for i in range(0, len(texts), batch_size)])


@torch.no_grad()
def class_embeddings(model: DualEncoder, tokenizer, bank: PromptBank, class_names: list[str],
                     batch_size: int = 256) -> torch.Tensor:
    """[K, D] unit vectors: the normalized mean of each class's unit template embeddings (the prompt
    ensemble, CLIP sec. 3.1.4)."""
    texts, class_ids = bank.all_prompts()
    embs = embed_texts(model, tokenizer, texts, batch_size)
    class_ids = torch.as_tensor(class_ids, device=embs.device)
    means = torch.zeros(len(class_names), embs.shape[1], device=embs.device).index_add_(0, class_ids, embs)
    return F.normalize(means, dim=-1)


@torch.no_grad()
def image_scores(model: DualEncoder, loader, class_emb: torch.Tensor,
                 autocast: torch.autocast | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits [N, K], true labels [N], dataset indices [N]) of every image against every class."""
    image_emb, labels, indices = embed_images(model, loader, autocast)
    return model.score(image_emb, class_emb).cpu().numpy(), labels, indices
