"""python -m weights_conversion {hf,open_clip,export-hf} --src ... --out DIR"""
from __future__ import annotations

import argparse
import sys

from .common import ConversionError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m weights_conversion",
                                     description="Convert upstream CLIP/SigLIP checkpoints to har_ref's format, "
                                                 "and har_ref checkpoints back to transformers' (export-hf).")
    sub = parser.add_subparsers(dest="command", required=True)
    hf = sub.add_parser("hf", help="a transformers CLIPModel/SiglipModel directory (save_pretrained or hub)",
                        description="Convert a directory written by CLIPModel/SiglipModel.save_pretrained "
                                    "(or downloaded from the hub) into DIR/config.json + DIR/model.safetensors "
                                    "+ tokenizer files.")
    hf.add_argument("--src", required=True, help="transformers checkpoint directory")
    hf.add_argument("--out", required=True, help="output har_ref checkpoint directory")
    oc = sub.add_parser("open_clip", help="an open_clip / OpenAI state dict file",
                        description="Convert an open_clip or OpenAI state dict (safetensors, or a plain "
                                    "state dict read with weights_only=True) into a har_ref checkpoint.")
    oc.add_argument("--src", required=True, help="state dict file (.safetensors, .bin, .pt)")
    oc.add_argument("--arch", required=True, choices=["ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16-SigLIP"],
                    help="open_clip architecture name")
    oc.add_argument("--out", required=True, help="output har_ref checkpoint directory")
    oc.add_argument("--bpe", default=None,
                    help="CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) to write vocab.json/merges.txt from")
    ex = sub.add_parser("export-hf", help="a har_ref checkpoint or training run -> transformers directory",
                        description="Write a har_ref checkpoint (or finished training run) directory as "
                                    "CLIPModel/SiglipModel.save_pretrained would, with its image processor and "
                                    "tokenizer files, loadable by from_pretrained and CLIPProcessor/SiglipProcessor.")
    ex.add_argument("--src", required=True, help="har_ref checkpoint or training run directory")
    ex.add_argument("--out", required=True, help="output transformers checkpoint directory")
    ex.add_argument("--drop-logit-bias", action="store_true",
                    help="export CLIP towers trained with the sigmoid loss without their logit bias b, which "
                         "CLIPModel cannot hold (refused otherwise)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "hf":
            from .hf import convert_hf
            out = convert_hf(args.src, args.out)
        elif args.command == "export-hf":
            from .export_hf import export_hf
            out = export_hf(args.src, args.out, args.drop_logit_bias)
        else:
            from .open_clip import convert_open_clip
            out = convert_open_clip(args.src, args.arch, args.out, bpe=args.bpe)
    except (ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}/config.json and {out}/model.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
