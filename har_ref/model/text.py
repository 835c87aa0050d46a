"""Text transformer configured as CLIP's or SigLIP's text tower.

    CLIP   : tokens + pos -> causal blocks -> ln_final -> state at <|endoftext|> -> proj (no bias)
    SigLIP : tokens + pos -> bidirectional blocks -> ln_final -> state at the LAST position -> head (bias)

SigLIP was trained on text padded to 64 tokens and pools the last position, which is
usually padding; the model attends to the padding, so callers reproduce upstream by
padding the same way (har_ref.model.tokenizer does).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import TextConfig
from .layers import Transformer, transformer_at_rows


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        if cfg.pool not in ("eos", "last"):
            raise ValueError(f"config.json: text.pool must be 'eos' or 'last', got {cfg.pool!r}.")
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, cfg.ln_eps)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=cfg.proj_bias)

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the pooled end-of-text token in each row, as transformers computes it."""
        if self.cfg.eos_by_argmax:  # OpenAI's rule: <|endoftext|> has the largest id
            return input_ids.argmax(dim=-1)
        return (input_ids == self.cfg.eos_token_id).int().argmax(dim=-1)  # first occurrence

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        L = input_ids.shape[1]
        if L > self.cfg.context_length:
            raise ValueError(f"text has {L} tokens but the model's context is {self.cfg.context_length}; "
                             "tokenize with har_ref.load_tokenizer, which truncates.")
        if self.cfg.pool == "eos":
            pool = self.eos_positions(input_ids)
            if self.cfg.causal:
                # Under a causal mask no position attends to later ones, so everything after
                # the batch's last pooled token cannot change the output: drop it. CLIP pads to
                # 77 but prompts are ~10 tokens, so this skips most of the text tower's work.
                L = int(pool.max()) + 1
                input_ids = input_ids[:, :L]
                attention_mask = None if attention_mask is None else attention_mask[:, :L]
        else:
            pool = torch.full((input_ids.shape[0],), L - 1, device=input_ids.device)  # SigLIP: the last position
        x = self.token_embed(input_ids) + self.pos_embed[:L]
        # self.transformer(x, ...)[b, pool[b]], computing only the pooled rows in the last block (layers.py).
        pooled = transformer_at_rows(self.transformer, x, pool, self.attention_bias(attention_mask, L, x.dtype),
                                     is_causal=self.cfg.causal and attention_mask is None)
        return self.proj(self.ln_final(pooled))

    def attention_bias(self, attention_mask: torch.Tensor | None, L: int, dtype: torch.dtype):
        """Additive mask [B, 1, L, L]: 0 where a query may attend to a key, dtype-min elsewhere.

        The most negative finite value (not -inf) keeps a row whose keys are all padding
        finite, as transformers does.
        """
        if attention_mask is None:
            return None
        allowed = attention_mask[:, None, None, :].bool()  # padding keys are never attended
        if self.cfg.causal:
            allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=allowed.device).tril()
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
