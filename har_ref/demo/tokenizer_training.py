"""Train small tokenizers for the offline demo, written in the upstream checkpoints' file formats.

No pretrained tokenizer is available offline, so the demo trains one on its own prompts:
- CLIP: byte-level BPE with CLIP's normalisation, word regex and `</w>` suffix, saved as
  `vocab.json` + `merges.txt` laid out like OpenAI's vocabulary (256 byte tokens, the same
  with `</w>`, one token per merge, then <|startoftext|>, <|endoftext|>), so transformers'
  CLIPTokenizer reads it and <|endoftext|> has the largest id (CLIP pools at argmax(input_ids)).
  Words come from the runtime `tokenizers` pipeline; the merges from `learn_bpe_merges` below,
  not `tokenizers`' BpeTrainer, whose tie-breaking changes from one process to the next.
- SigLIP: a SentencePiece unigram model `spiece.model` with T5's special ids
  (<pad>=0, </s>=1, <unk>=2), trained on canonicalised text, as transformers' SiglipTokenizer expects.

Both are deterministic and return the ids that belong in config.json
(vocab_size, eos_token_id, pad_token_id).
"""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import sentencepiece

from ..model.tokenizer import (CLIP_BOS, CLIP_EOS, bytes_to_unicode, canonicalize_text, clip_normalizer,
                               clip_pre_tokenizer)

N_BYTES = 256


def learn_bpe_merges(word_counts: Counter[str], n_merges: int) -> list[tuple[str, str]]:
    """BPE (Sennrich et al. 2016, Algorithm 1): merge the most frequent adjacent symbol pair, again
    and again. A word starts as its characters, the last one carrying CLIP's end-of-word `</w>`.

    Ties go to the smallest pair, so the result never depends on hash order (the `tokenizers`
    BpeTrainer breaks ties by internal ids that change from one process to the next).
    """
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): count for w, count in word_counts.items()}
    pair_counts: Counter[tuple[str, str]] = Counter()
    for symbols, count in words.items():
        _count_pairs(pair_counts, symbols, count)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges and pair_counts:
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        for symbols in [s for s in words if best in zip(s, s[1:])]:
            count = words.pop(symbols)
            merged = _merge_pair(symbols, best)
            _count_pairs(pair_counts, symbols, -count)
            _count_pairs(pair_counts, merged, count)
            words[merged] = count
        pair_counts = +pair_counts  # drop pairs that no longer occur
    return merges


def _count_pairs(pair_counts: Counter, symbols: tuple[str, ...], count: int) -> None:
    for pair in zip(symbols, symbols[1:]):
        pair_counts[pair] += count


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every occurrence of `pair` in `symbols`, left to right, by its concatenation."""
    out, i = [], 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def train_clip_bpe(texts: list[str], out_dir: str | Path, vocab_size: int) -> dict[str, int]:
    """Learn at most `vocab_size - 514` BPE merges on `texts`; write vocab.json and merges.txt."""
    n_merges = vocab_size - 2 * N_BYTES - 2
    if n_merges < 1:
        raise ValueError(f"vocab_size must be above {2 * N_BYTES + 2} (bytes, bytes + '</w>', 2 specials), "
                         f"got {vocab_size}.")
    # Words exactly as the runtime pipeline sees them: normalised, split, bytes as characters.
    normalizer, pre_tokenizer = clip_normalizer(), clip_pre_tokenizer()
    word_counts = Counter(word for text in texts
                          for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    merges = learn_bpe_merges(word_counts, n_merges)

    byte_tokens = list(bytes_to_unicode().values())
    # Two merges can spell the same token ("a"+"bc", "ab"+"c"): it gets one id.
    tokens = list(dict.fromkeys(byte_tokens + [t + "</w>" for t in byte_tokens] + [a + b for a, b in merges]))
    tokens += [CLIP_BOS, CLIP_EOS]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(tokens)}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return dict(vocab_size=len(tokens), eos_token_id=vocab[CLIP_EOS], pad_token_id=vocab[CLIP_EOS],
                bos_token_id=vocab[CLIP_BOS])


def train_sentencepiece(texts: list[str], out_dir: str | Path, vocab_size: int) -> dict[str, int]:
    """Learn a unigram SentencePiece model of up to `vocab_size` pieces; write spiece.model."""
    sentences = [s for s in map(canonicalize_text, texts) if s]  # the tokenizer only ever sees these
    if not sentences:
        raise ValueError("train_sentencepiece needs at least one text with a letter or digit in it.")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,  # SigLIP's (T5's) layout; SigLIP has no <s>
        hard_vocab_limit=False,  # a small corpus may support fewer pieces than asked for
        character_coverage=1.0, num_threads=1, minloglevel=2)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spiece.model").write_bytes(model.getvalue())
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    # SigLIP pads with </s>, "the way the model was trained" (transformers' SiglipTokenizer).
    return dict(vocab_size=processor.get_piece_size(), eos_token_id=1, pad_token_id=1)
