"""har-ref: a minimal, auditable pure-PyTorch reference for fine-tuning CLIP and SigLIP on HAR."""
from .model.config import ModelConfig, TextConfig, VisionConfig
from .model.dual_encoder import DualEncoder, load_model, save_model


def load_tokenizer(directory):
    """The checkpoint's tokenizer: texts -> (input_ids, attention_mask) LongTensors."""
    from .model.tokenizer import load_tokenizer as _load  # sentencepiece/tokenizers load only when asked

    return _load(directory)


__all__ = ["ModelConfig", "VisionConfig", "TextConfig", "DualEncoder", "load_model", "save_model",
           "load_tokenizer"]
