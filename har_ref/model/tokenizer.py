"""Text tokenizers: CLIP byte-level BPE and SigLIP SentencePiece, id-for-id with transformers.

CLIP (Radford et al. 2021, sec. 2.4: "lower-cased byte pair encoding ... bracketed with [SOS] and
[EOS] tokens") runs on the `tokenizers` package with the pipeline transformers builds in
`convert_slow_tokenizer.CLIPConverter`: NFC, every whitespace run -> one space, lowercase; words
split by CLIP's regex; byte-level BPE with the end-of-word suffix `</w>`. A row is
`<|startoftext|> text <|endoftext|>`, truncated so that <|endoftext|> stays last, padded with
the pad id (<|endoftext|> = 49407 for openai/clip-vit-base-patch32).

transformers, not open_clip, is the reference: open_clip (and OpenAI's repository) also run
`ftfy.fix_text` and `html.unescape` (`Tom &amp; Jerry` -> `Tom & Jerry`, mojibake `cafÃ©` ->
`café`, ligatures, full-width letters, curly quotes). We follow transformers because the
checkpoints we load come from transformers, ftfy is not a runtime dependency, and the two agree
on every well-formed prompt (tests/test_tokenizer.py shows where they differ).

SigLIP (Zhai et al. 2023) uses a SentencePiece model (`spiece.model`) after big_vision's text
canonicalisation (lowercase, ASCII punctuation removed, whitespace collapsed); `</s>` is
appended and rows are padded to 64 with `</s>`, "the way the model was trained" (transformers'
SiglipTokenizer with padding='max_length'). We replay transformers' SiglipTokenizer step by
step, including its `<unk>`-prefix trick, so that ids match on any input.
"""
from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Sequence

import sentencepiece
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .config import ModelConfig

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
# CLIP's word regex (OpenAI CLIP's simple tokenizer): common English contractions, letter runs,
# single digits, runs of other non-space symbols.
CLIP_WORD_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

SPIECE_UNDERLINE = "\u2581"  # SentencePiece's visible space "▁"
SIGLIP_EOS = "</s>"
SIGLIP_UNK = "<unk>"

# The files a checkpoint directory keeps its tokenizer in, as transformers' save_pretrained names them;
# they travel with the weights (conversion, runs, WiSE-FT mixes, export). added_tokens.json is not read
# here (load_tokenizer) but kept, so a converted checkpoint exports back with every file it came with.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "spiece.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's map from each byte to a printable character: printable Latin-1 bytes map to
    themselves, the other 68 to chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return dict(zip(printable + others, map(chr, printable + list(range(256, 256 + len(others))))))


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("A tokenizer takes a list of strings; wrap a single prompt as [prompt].")
    return list(texts)


def _to_tensors(rows: list[list[int]], context_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad every row to `context_length`; attention_mask is 1 on real tokens."""
    input_ids = torch.full((len(rows), context_length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), context_length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


# ----------------------------------------------------------------------------- CLIP


def clip_normalizer() -> normalizers.Normalizer:
    """NFC, every whitespace run -> one space, lowercase."""
    return normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])


def clip_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Words by CLIP's regex (spaces dropped), then each word's UTF-8 bytes as printable characters."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORD_REGEX), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])


def clip_bpe_pipeline(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """The `tokenizers` pipeline of transformers' CLIPConverter, built from a vocab and merges."""
    missing = [token for token in (CLIP_BOS, CLIP_EOS) if token not in vocab]
    if missing:
        raise ValueError(f"The CLIP vocabulary lacks {missing}; use the checkpoint's own vocab.json.")
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="</w>", fuse_unk=False, unk_token=CLIP_EOS))
    tokenizer.normalizer = clip_normalizer()
    tokenizer.pre_tokenizer = clip_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(CLIP_BOS, special=True, normalized=False),
                                  AddedToken(CLIP_EOS, special=True, normalized=False)])
    # RobertaProcessing is transformers' way to get "<bos> text <eos>" with byte-level offsets.
    tokenizer.post_processor = processors.RobertaProcessing(
        (CLIP_EOS, vocab[CLIP_EOS]), (CLIP_BOS, vocab[CLIP_BOS]), trim_offsets=False, add_prefix_space=False)
    return tokenizer


class ClipTokenizer:
    """CLIP BPE from `tokenizer.json`, or else `vocab.json` + `merges.txt`, in `directory`."""

    def __init__(self, directory: str | Path, context_length: int = 77, pad_token_id: int | None = None):
        directory = Path(directory)
        if (directory / "tokenizer.json").is_file():
            self.backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            vocab, merges = BPE.read_file(str(directory / "vocab.json"), str(directory / "merges.txt"))
            self.backend = clip_bpe_pipeline(vocab, merges)
        else:
            raise FileNotFoundError(
                f"No CLIP tokenizer in {directory}: copy tokenizer.json (or vocab.json and merges.txt) "
                "from the upstream checkpoint into it.")
        self.bos_token_id = self._special_id(CLIP_BOS, directory)
        self.eos_token_id = self._special_id(CLIP_EOS, directory)
        self.pad_token_id = self.eos_token_id if pad_token_id is None else pad_token_id
        self.context_length = context_length
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        # transformers' truncation=True: the post-processor's <bos>/<eos> are kept, the text is cut.
        self.backend.enable_truncation(max_length=context_length)
        self.backend.no_padding()

    def _special_id(self, token: str, directory: Path) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"The CLIP tokenizer in {directory} has no {token} token; use the checkpoint's own files.")
        return token_id

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # One text at a time: encode_batch's thread pool makes `tokenizers` warn in forked DataLoader workers.
        rows = [self.backend.encode(text).ids for text in _check_texts(texts)]
        return _to_tensors(rows, self.context_length, self.pad_token_id)


# ----------------------------------------------------------------------------- SigLIP


def canonicalize_text(text: str) -> str:
    """big_vision's prompt canonicalisation (as transformers' SigLIP tokenizer canonicalizes):
    lowercase, drop ASCII punctuation, collapse whitespace, strip."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


class SiglipTokenizer:
    """SentencePiece from `spiece.model` in `directory`, replaying transformers' SiglipTokenizer."""

    def __init__(self, directory: str | Path, context_length: int = 64, pad_token_id: int | None = None):
        path = Path(directory) / "spiece.model"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: copy spiece.model from the upstream SigLIP checkpoint into {directory}.")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.special_ids = {token: self._piece_id(token, path) for token in (SIGLIP_EOS, SIGLIP_UNK)}
        self.eos_token_id = self.special_ids[SIGLIP_EOS]
        self.pad_token_id = self.eos_token_id if pad_token_id is None else pad_token_id
        self.context_length = context_length
        self.vocab_size = self.sp.get_piece_size()
        # transformers splits its special tokens out of the raw text first and strips the spaces
        # around them (AddedToken lstrip=rstrip=True).
        self._special_split = re.compile(r"(\s*(?:</s>|<unk>)\s*)")
        self._unk_prefix_length = len(self.sp.encode(SIGLIP_UNK, out_type=str))

    def _piece_id(self, piece: str, path: Path) -> int:
        piece_id = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(piece_id) != piece:
            raise ValueError(f"{path} has no {piece} piece; SigLIP needs a SentencePiece model with </s> and <unk>.")
        return piece_id

    def _encode_chunk(self, chunk: str) -> list[str]:
        # transformers encodes "<unk>" + text and drops the pieces of "<unk>": this keeps a
        # leading "▁" of `text` as a word boundary whatever the model's add_dummy_prefix says.
        pieces = self.sp.encode(SIGLIP_UNK + canonicalize_text(chunk), out_type=str)
        return pieces[self._unk_prefix_length:] if len(pieces) >= self._unk_prefix_length else pieces

    def encode(self, text: str) -> list[int]:
        """Ids of one text with </s> appended, truncated to the context length."""
        text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        pieces: list[str] = []
        for i, chunk in enumerate(self._special_split.split(text)):
            if i % 2 == 1:
                pieces.append(chunk.strip())
            elif chunk:
                pieces.extend(self._encode_chunk(chunk))
        if len(pieces) > 1 and pieces[0] == SPIECE_UNDERLINE and pieces[1] in self.special_ids:
            pieces = pieces[1:]
        ids = [self.special_ids[p] if p in self.special_ids else self.sp.piece_to_id(p) for p in pieces]
        ids = ids[: self.context_length - 1]  # room for </s>
        if not ids or ids[-1] != self.eos_token_id:  # transformers does not append a second </s>
            ids.append(self.eos_token_id)
        return ids

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.encode(t) for t in _check_texts(texts)]
        return _to_tensors(rows, self.context_length, self.pad_token_id)


# ----------------------------------------------------------------------------- loading


def declared_pad_token(directory: Path) -> str | None:
    """The pad token named by the checkpoint's special_tokens_map.json / tokenizer_config.json."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            pad = json.loads(path.read_text()).get("pad_token")
            if pad is not None:
                return pad["content"] if isinstance(pad, dict) else pad
    return None


def load_tokenizer(directory: str | Path) -> ClipTokenizer | SiglipTokenizer:
    """The tokenizer of the checkpoint in `directory`, set up from its config.json.

    Calling it on a list of N strings returns (input_ids, attention_mask), LongTensors [N, context_length].
    """
    directory = Path(directory)
    cfg = ModelConfig.load(directory)
    tokenizer_class = ClipTokenizer if cfg.family == "clip" else SiglipTokenizer
    tokenizer = tokenizer_class(directory, cfg.text.context_length, cfg.text.pad_token_id)
    if tokenizer.vocab_size > cfg.text.vocab_size:
        raise ValueError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's "
                         f"text.vocab_size is {cfg.text.vocab_size}; the tokenizer files belong to another model.")
    # SigLIP pools the last position and never reads eos_token_id; an id outside the embedding table
    # is transformers' CLIP default (49407) that conversions before token_ids_from carried over.
    carried_default = cfg.text.pool == "last" and cfg.text.eos_token_id >= cfg.text.vocab_size
    if not cfg.text.eos_by_argmax and tokenizer.eos_token_id != cfg.text.eos_token_id and not carried_default:
        raise ValueError(f"{directory}: config.json says text.eos_token_id={cfg.text.eos_token_id} but the "
                         f"tokenizer's end token has id {tokenizer.eos_token_id}; fix config.json.")
    pad_token = declared_pad_token(directory)
    pad_id = None if pad_token is None else token_id(tokenizer, pad_token)
    if pad_id is not None and pad_id != cfg.text.pad_token_id:
        raise ValueError(f"{directory}: config.json says text.pad_token_id={cfg.text.pad_token_id} but the "
                         f"tokenizer pads with {pad_token!r} (id {pad_id}); fix config.json.")
    return tokenizer


def token_id(tokenizer: ClipTokenizer | SiglipTokenizer, token: str) -> int | None:
    if isinstance(tokenizer, ClipTokenizer):
        return tokenizer.backend.token_to_id(token)
    return tokenizer.sp.piece_to_id(token)
