"""Shared pieces of every conversion: reading state dicts safely, and the one-to-one key check.

Every conversion must use each source tensor exactly once and fill each har_ref tensor
exactly once with the right shape; `KeyMapper.finish` enforces that and names the
offending keys in one message.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from har_ref.model.config import ModelConfig
from har_ref.model.dual_encoder import DualEncoder, read_safetensors, save_model


class ConversionError(ValueError):
    pass


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a pickled state dict loaded with weights_only=True (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} not found: pass the checkpoint file or directory with --src.")
    if path.suffix == ".safetensors":
        try:
            return read_safetensors(path)
        except ValueError as e:  # damaged or not safetensors at all: one sentence, not a traceback
            raise ConversionError(str(e)) from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything that is not plain tensors/containers
        raise ConversionError(f"{path} could not be read as a plain state dict with weights_only=True "
                              f"({type(e).__name__}); save it as safetensors or a plain state dict.") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    return obj


def _listing(keys: list[str], shown: int = 12) -> str:
    more = f" (and {len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


class KeyMapper:
    """Collects target tensors while recording which source keys were consumed."""

    def __init__(self, source: dict[str, torch.Tensor], ignore: tuple[str, ...] = ()):
        # `ignore`: source entries that are not weights (buffers such as position_ids, or
        # OpenAI's scalar metadata); they are dropped explicitly, never silently.
        self.source = {k: v for k, v in source.items() if not any(k.endswith(s) for s in ignore)}
        self.used: set[str] = set()
        self.target: dict[str, torch.Tensor] = {}
        self.duplicates: list[str] = []
        self.missing_source: list[str] = []

    def take(self, key: str) -> torch.Tensor:
        if key not in self.source:
            self.missing_source.append(key)
            return torch.empty(0)
        if key in self.used:
            self.duplicates.append(key)
        self.used.add(key)
        return self.source[key]

    def put(self, key: str, value: torch.Tensor) -> None:
        if key in self.target:
            self.duplicates.append(key)
        self.target[key] = value

    def finish(self, cfg: ModelConfig) -> dict[str, torch.Tensor]:
        with torch.device("meta"):
            expected = DualEncoder(cfg).state_dict()
        unused = sorted(set(self.source) - self.used)
        unfilled = sorted(set(expected) - set(self.target))
        extra = sorted(set(self.target) - set(expected))
        shapes = sorted(f"{k}: {tuple(v.shape)} vs expected {tuple(expected[k].shape)}"
                        for k, v in self.target.items() if k in expected and v.shape != expected[k].shape)
        problems = [f"{name}: {_listing(keys)}" for name, keys in (
            ("missing in source", self.missing_source), ("unused source tensors", unused),
            ("har_ref tensors not filled", unfilled), ("unknown har_ref tensors", extra),
            ("wrong shapes", shapes), ("used twice", sorted(set(self.duplicates)))) if keys]
        if problems:
            raise ConversionError("conversion stopped, the checkpoint does not match its config: "
                                  + "; ".join(problems))
        return {k: v.contiguous() for k, v in self.target.items()}


def write_checkpoint(cfg: ModelConfig, tensors: dict[str, torch.Tensor], out: str | Path,
                     extra_files: list[Path] = ()) -> Path:
    """Load the converted tensors into a DualEncoder (a second strict check) and save it."""
    out = Path(out)
    with torch.device("meta"):
        model = DualEncoder(cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    save_model(model, out)
    for f in extra_files:
        shutil.copy(f, out / f.name)
    return out
