"""Tokenizers: id-for-id parity with transformers (CLIP BPE, SigLIP SentencePiece) and open_clip.

CLIP uses OpenAI's real BPE vocabulary, shipped inside open_clip_torch, laid out in vocab.json /
merges.txt exactly as the openai/clip-vit-base-patch32 checkpoint has them. transformers 5 has a
single CLIPTokenizer (on `tokenizers`; the pure-python "slow" one is gone), so the python
reference is open_clip's SimpleTokenizer, OpenAI's original code.

open_clip and transformers disagree where open_clip's `ftfy.fix_text` + `html.unescape` change
the text (HTML entities, mojibake, ligatures, full-width letters, curly quotes, control
characters) or where Python's `str.lower` and `tokenizers`' per-character lowercase differ (a
word-final capital sigma). har_ref follows transformers: the checkpoints are converted from
transformers, ftfy is not a runtime dependency, and well-formed prompts are unaffected. Those
inputs are tested separately. open_clip pads with 0 and transformers with <|endoftext|>
(49407), so open_clip is compared on the attention-mask positions and must be 0 elsewhere.
"""
import gzip
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from open_clip import tokenizer as open_clip_tokenizer

from har_ref.model.config import clip_vit_b32, siglip_base_patch16_224
from har_ref.model.tokenizer import ClipTokenizer, SiglipTokenizer, load_tokenizer
from har_ref.demo.tokenizer_training import (bytes_to_unicode, learn_bpe_merges, train_clip_bpe,
                                        train_sentencepiece)

BOS, EOS = 49406, 49407

# --- deterministic test strings ----------------------------------------------------------------

CLIP_PIECES = [
    "a", "photo", "of", "the", "person", "Running", "JUMPING", "don't", "it's", "we'll", "I'm",
    "they're", "3.14", "2024", "1st", "#hashtag", "@user", "e-mail", "C++", "naïve", "café", "Ünïcödé",
    "ß", "日本語", "中文字", "한국어", "😀", "👍🏽", "🏃‍♀️", "!!!", "?", "...", "(x)", "[y]", "{z}",
    '"q"', "'s", "  ", "\t", "\n", "\r\n", "—", "%", "$5", "€", "½", "x²", "Ω", "Привет", "مرحبا", "ไทย",
    "cafe\u0301", "A\u030angstr\u00f6m",  # decomposed accents: NFC composes them
]
# open_clip's ftfy/html/str.lower steps change these, transformers (and har_ref) do not.
OPEN_CLIP_DIFFERS = [
    "Tom &amp; Jerry", "&lt;b&gt;", "cafÃ©", "ﬁne ﬂow", "ＡＢＣ ｆｕｌｌ", "don’t “quote”", "ΣΑΣ ΟΔΟΣ",
    "a\x00b\x1fc", "\ufeffbom",
]
SPECIAL_TEXT = ["<|endoftext|>", "x <|startoftext|>hi", "<|ENDOFTEXT|>", "", "   ", "\t\n"]


def varied_texts(pieces: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = ["".join(rng.choice(pieces) + rng.choice([" ", "", "  ", "\t", "\n"])
                     for _ in range(rng.randint(0, 14))) for _ in range(n)]
    return texts + ["word " * 100, "a" * 400, " ".join(str(i) for i in range(90)), "running, " * 40]


# --- CLIP --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """openai/clip-vit-base-patch32's vocab.json and merges.txt, rebuilt from open_clip's BPE file."""
    lines = gzip.open(open_clip_tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    directory = tmp_path_factory.mktemp("clip")
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def simple_tokenizer():
    """OpenAI's original python BPE tokenizer, as open_clip ships it."""
    return open_clip_tokenizer.SimpleTokenizer()


@pytest.fixture(scope="module")
def hf_clip(clip_dir):
    return transformers.CLIPTokenizer.from_pretrained(clip_dir)


def hf_ids(tokenizer, texts, length):
    out = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return out.input_ids, out.attention_mask


def test_clip_vocab_is_openais(clip_dir, simple_tokenizer):
    """The fixture reproduces OpenAI's vocabulary id for id (open_clip names the specials differently)."""
    vocab = json.loads((clip_dir / "vocab.json").read_text(encoding="utf-8"))
    reference = simple_tokenizer.encoder
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert len(vocab) == 49408
    assert vocab == {renamed.get(t, t): i for t, i in reference.items()}
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (BOS, EOS)


@pytest.mark.parametrize("source", ["vocab_merges", "tokenizer_json"])
def test_clip_matches_transformers(clip_dir, hf_clip, tmp_path, source):
    directory = clip_dir
    if source == "tokenizer_json":  # a checkpoint saved by transformers holds tokenizer.json only
        hf_clip.save_pretrained(tmp_path)
        assert not (tmp_path / "vocab.json").exists()
        directory = tmp_path
    texts = varied_texts(CLIP_PIECES, 300, seed=0) + OPEN_CLIP_DIFFERS + SPECIAL_TEXT
    ids, mask = ClipTokenizer(directory)(texts)
    expected_ids, expected_mask = hf_ids(hf_clip, texts, 77)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == (len(texts), 77)
    assert torch.equal(ids, expected_ids)
    assert torch.equal(mask, expected_mask)


def test_clip_matches_open_clip(clip_dir):
    texts = varied_texts(CLIP_PIECES, 300, seed=1)
    ids, mask = ClipTokenizer(clip_dir)(texts)
    reference = open_clip_tokenizer.tokenize(texts)
    real = mask.bool()
    assert torch.equal(ids[real], reference[real])
    assert (reference[~real] == 0).all() and (ids[~real] == EOS).all()


def test_clip_where_open_clip_differs_follows_transformers(clip_dir, hf_clip):
    ids, _ = ClipTokenizer(clip_dir)(OPEN_CLIP_DIFFERS)
    assert torch.equal(ids, hf_ids(hf_clip, OPEN_CLIP_DIFFERS, 77)[0])
    reference = open_clip_tokenizer.tokenize(OPEN_CLIP_DIFFERS)
    reference[reference == 0] = EOS
    assert all(not torch.equal(a, b) for a, b in zip(ids, reference))  # each case really differs


def test_clip_truncation_keeps_end_token_last(clip_dir, simple_tokenizer):
    tokenizer = ClipTokenizer(clip_dir)
    long_text = " ".join(f"word{i}" for i in range(200))
    ids, mask = tokenizer([long_text])
    assert mask.all() and ids[0, 0] == BOS and ids[0, -1] == EOS
    text_tokens = simple_tokenizer.encode(long_text)
    assert len(text_tokens) > 200 and ids[0, 1:-1].tolist() == text_tokens[:75]
    short_ids, short_mask = tokenizer(["a photo of a person running"])
    assert short_ids[0, : int(short_mask.sum())].tolist() == [BOS, 320, 1125, 539, 320, 2533, 2761, EOS]
    assert (short_ids[0, int(short_mask.sum()) :] == EOS).all()


def test_clip_rejects_a_bare_string(clip_dir):
    with pytest.raises(TypeError, match="list of strings"):
        ClipTokenizer(clip_dir)("a photo")


# --- SigLIP ------------------------------------------------------------------------------------

SIGLIP_WORDS = ("a photo of the person is running jumping eating drinking water sleeping reading book "
                "riding bike horse playing guitar cooking dancing someone human image picture blurry "
                "cropped cycling climbing fishing calling phone laptop laughing hugging fighting").split()


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(SIGLIP_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    directory = tmp_path_factory.mktemp("siglip")
    ids = train_sentencepiece(sentences, directory, vocab_size=300)
    assert ids["eos_token_id"] == ids["pad_token_id"] == 1
    return directory


@pytest.mark.filterwarnings("ignore:This sequence already has </s>")
def test_siglip_matches_transformers(siglip_dir):
    pieces = SIGLIP_WORDS + list("ABCxyz0123456789 .,!?;:'\"-_()[]{}/\\@#$%^&*+=<>|~`\t\n") + [
        "é", "ß", "日本", "😀", "\u2581", "  ", "</s>", "<unk>", "<pad>", "</S>", " </s> ", "Running", "PHOTO"]
    texts = varied_texts(pieces, 300, seed=2) + [
        "", " ", "A photo of a person RUNNING!", "</s>", "</s> hi", "hi </s>", "a</s>b", "<unk>hello",
        "\u2581hello", "hello\u2581world", "!!!", "running " * 62 + "</s>", "running " * 63 + "</s>"]
    ids, mask = SiglipTokenizer(siglip_dir)(texts)
    reference = transformers.SiglipTokenizer(vocab_file=str(siglip_dir / "spiece.model"))
    expected_ids, expected_mask = hf_ids(reference, texts, 64)
    assert ids.shape == (len(texts), 64)
    assert torch.equal(ids, expected_ids)
    assert torch.equal(mask, expected_mask)


# --- load_tokenizer ----------------------------------------------------------------------------


def test_load_tokenizer_round_trip(clip_dir, siglip_dir):
    texts = ["a photo of a person cooking.", "Someone RIDING a horse!!"]
    for directory, cfg, direct in [(clip_dir, clip_vit_b32(), ClipTokenizer(clip_dir)),
                                   (siglip_dir, siglip_base_patch16_224(), SiglipTokenizer(siglip_dir))]:
        cfg.save(directory)
        ids, mask = load_tokenizer(directory)(texts)
        assert ids.shape == mask.shape == (2, cfg.text.context_length) and ids.dtype == torch.long
        assert all(torch.equal(a, b) for a, b in zip((ids, mask), direct(texts)))
        assert ids[0, int(mask[0].sum()) - 1] == cfg.text.eos_token_id
        assert (ids[mask == 0] == cfg.text.pad_token_id).all()


def test_load_tokenizer_errors(tmp_path, clip_dir):
    clip_vit_b32().save(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    siglip_base_patch16_224().save(tmp_path)
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        load_tokenizer(tmp_path)
    # A config whose pad id disagrees with the tokenizer's declared pad token is refused.
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((clip_dir / name).read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    cfg = clip_vit_b32()
    cfg.text.pad_token_id = 0
    cfg.save(tmp_path)
    with pytest.raises(ValueError, match="pad_token_id=0"):
        load_tokenizer(tmp_path)


# --- training ----------------------------------------------------------------------------------


def demo_prompts(n: int = 1000) -> list[str]:
    rng = random.Random(0)
    templates = ["a photo of a person {}.", "a photo of someone {}", "An image of a human {}!",
                 "a cropped photo of a person {}", "a blurry photo of a person {}.", "A person is {} here"]
    actions = ["running", "jumping", "eating", "drinking water", "sleeping", "reading a book", "riding a bike",
               "playing guitar", "cooking", "dancing", "cycling", "texting on a phone", "using a laptop",
               "fighting", "hugging", "laughing", "calling", "climbing", "fishing", "sitting"]
    return [rng.choice(templates).format(rng.choice(actions)) + f" #{rng.randint(0, 99)}" for _ in range(n)]


def naive_bpe(word_counts, n_merges):
    """Textbook BPE that recounts every pair at every step (the reference for the incremental one)."""
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): c for w, c in word_counts.items()}
    merges = []
    for _ in range(n_merges):
        counts = {}
        for symbols, c in words.items():
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + c
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        new_words = {}
        for symbols, c in words.items():
            out, i = [], 0
            while i < len(symbols):
                if tuple(symbols[i : i + 2]) == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_words[tuple(out)] = c
        words = new_words
    return merges


def test_learn_bpe_merges_equals_textbook_bpe():
    rng = random.Random(3)
    word_counts = {"".join(rng.choice("aab") for _ in range(rng.randint(1, 9))): rng.randint(1, 5)
                   for _ in range(200)}
    assert learn_bpe_merges(word_counts, 150) == naive_bpe(word_counts, 150)


def test_train_clip_bpe(tmp_path):
    prompts = demo_prompts()
    start = time.perf_counter()
    ids = train_clip_bpe(prompts, tmp_path / "a", vocab_size=1000)
    assert time.perf_counter() - start < 5
    vocab = json.loads((tmp_path / "a" / "vocab.json").read_text(encoding="utf-8"))
    assert ids["vocab_size"] == len(vocab) <= 1000
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (len(vocab) - 2, len(vocab) - 1)
    assert ids["eos_token_id"] == ids["pad_token_id"] == len(vocab) - 1
    # Deterministic, also in a fresh process with another hash seed (tokenizers' BpeTrainer is not).
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    script = ("import json, sys; from har_ref.demo.tokenizer_training import train_clip_bpe; "
              "train_clip_bpe(json.load(open(sys.argv[1])), sys.argv[2], 1000)")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "prompts.json"), str(tmp_path / "b")],
                   check=True, env=dict(os.environ, PYTHONHASHSEED="123"), cwd=Path(__file__).parent.parent)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # transformers reads the files and agrees with har_ref; <|endoftext|> is each row's argmax.
    texts = prompts[:50] + ["an unseen prompt: Zebra-crossing 42 ☂"]
    har_ids, har_mask = ClipTokenizer(tmp_path / "a")(texts)
    assert torch.equal(har_ids, hf_ids(transformers.CLIPTokenizer.from_pretrained(tmp_path / "a"), texts, 77)[0])
    assert torch.equal(har_ids.argmax(dim=1), har_mask.sum(dim=1) - 1)
    # Every word of the training prompts became one token.
    assert ClipTokenizer(tmp_path / "a")(["a photo of a person running"])[1].sum() == 2 + 6


def test_train_sentencepiece(tmp_path):
    prompts = demo_prompts()
    start = time.perf_counter()
    ids = train_sentencepiece(prompts, tmp_path / "a", vocab_size=200)
    assert time.perf_counter() - start < 5
    train_sentencepiece(prompts, tmp_path / "b", vocab_size=200)
    assert (tmp_path / "a" / "spiece.model").read_bytes() == (tmp_path / "b" / "spiece.model").read_bytes()
    tokenizer = SiglipTokenizer(tmp_path / "a")
    assert ids == dict(vocab_size=tokenizer.vocab_size, eos_token_id=1, pad_token_id=1)
    assert [tokenizer.sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    row, mask = tokenizer(["A photo of a person cooking."])
    assert row[0, int(mask.sum()) - 1] == 1 and 2 not in row[0].tolist()  # </s> last, no <unk>
