"""Prompts: class names -> the texts the text tower reads (study sec. 3).

A template bank (JSON, editable) holds generic templates with one "{}" for the class phrase and
optional per-class extras. Training draws one template per example per epoch (PromptSampler);
evaluation averages the text embeddings of every template of a class (the prompt ensemble of the
CLIP paper, sec. 3.1.4).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.json")


def class_phrase(class_name: str) -> str:
    """Folder name -> the phrase put into templates: "listening_to_music" -> "listening to music"."""
    return class_name.replace("_", " ")


def _check_templates(value, path: Path, key: str, exactly_one: bool) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise ValueError(f"{path}: {key} must be a non-empty list of strings; fix the prompt file.")
    for t in value:
        n = t.count("{}")
        if "{" in t.replace("{}", "") or "}" in t.replace("{}", "") or n > 1 or (exactly_one and n != 1):
            need = "exactly one {}" if exactly_one else "at most one {}"
            raise ValueError(f"{path}: template {t!r} in {key} must contain {need} (the class phrase) "
                             "and no other braces; fix the prompt file.")
    return value


class PromptBank:
    """Per-class prompts built from an editable JSON template bank (har_ref/data/prompts.json).

    Schema: {"templates": [...], "class_templates": {class: [...]}, "replace_templates": {class: [...]}}.
    A class's prompts are the generic `templates` followed by its `class_templates`, unless it has
    `replace_templates` (written by a per-class prompt ablation), which then stand alone. Generic
    templates hold exactly one "{}" for the class phrase; per-class ones hold at most one (they may
    spell the class out, e.g. "a photo of a person typing on a laptop.").
    """

    def __init__(self, class_names: Sequence[str], prompts: dict[str, list[str]]):
        self.class_names = list(class_names)
        self.prompts = prompts  # class name -> filled-in prompt texts

    @classmethod
    def from_file(cls, path: str | Path | None, class_names: Sequence[str]) -> "PromptBank":
        """Read and validate a template file (None: the packaged prompts.json)."""
        path = Path(path) if path is not None else DEFAULT_PROMPTS
        if not path.is_file():
            raise FileNotFoundError(f"Prompt file {path} not found; pass an existing JSON file "
                                    f"(the default is {DEFAULT_PROMPTS}).")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); fix the prompt file.") from e
        if not isinstance(spec, dict) or "templates" not in spec:
            raise ValueError(f"{path} must be a JSON object with a 'templates' list; fix the prompt file.")
        unknown = sorted(set(spec) - {"templates", "class_templates", "replace_templates"})
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; the allowed keys are 'templates', "
                             "'class_templates' and 'replace_templates'.")
        generic = _check_templates(spec["templates"], path, "'templates'", exactly_one=True)
        per_class = {}
        for key in ("class_templates", "replace_templates"):
            table = spec.get(key, {})
            if not isinstance(table, dict):
                raise ValueError(f"{path}: '{key}' must be an object mapping class names to template lists.")
            for name, value in table.items():
                if name not in class_names:
                    raise ValueError(f"{path}: '{key}' has unknown class {name!r}; the classes are "
                                     f"{', '.join(class_names)}.")
                per_class[key, name] = _check_templates(value, path, f"'{key}'[{name!r}]", exactly_one=False)
        prompts = {}
        for name in class_names:
            templates = (per_class.get(("replace_templates", name))
                         or generic + per_class.get(("class_templates", name), []))
            prompts[name] = [t.replace("{}", class_phrase(name)) for t in templates]
        return cls(class_names, prompts)

    def templates_for(self, class_name: str) -> list[str]:
        """The prompt texts of one class (templates filled with its phrase)."""
        return self.prompts[class_name]

    def all_prompts(self) -> tuple[list[str], list[int]]:
        """Every prompt of every class with its class id: the evaluation ensemble."""
        texts, class_ids = [], []
        for class_id, name in enumerate(self.class_names):
            texts += self.prompts[name]
            class_ids += [class_id] * len(self.prompts[name])
        return texts, class_ids


class PromptSampler:
    """The template bank tokenized once; one template drawn per example per epoch (study sec. 3).

    The draw depends only on (seed, epoch, dataset index), not on batching or rank, so a run
    on 2 GPUs sees the same (image, prompt) pairs as a run on one.
    """

    def __init__(self, bank: PromptBank, class_names: list[str], tokenizer, device: torch.device, seed: int):
        self.ids = [tokenizer(bank.templates_for(c))[0].to(device) for c in class_names]
        self.seed = seed

    def pick(self, labels: torch.Tensor, indices: torch.Tensor, epoch: int, dataset_size: int) -> list[int]:
        """Which template of its class each example gets: a function of (seed, epoch, index) only."""
        uniform = torch.rand(dataset_size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return (uniform[indices.cpu()] * torch.tensor([len(self.ids[c]) for c in labels.tolist()])).long().tolist()

    def sample(self, labels: torch.Tensor, indices: torch.Tensor, epoch: int, dataset_size: int) -> torch.Tensor:
        """The token ids of each example's drawn prompt, [B, context_length]."""
        picks = self.pick(labels, indices, epoch, dataset_size)
        return torch.stack([self.ids[c][k] for c, k in zip(labels.tolist(), picks)])
