"""python -m har_ref {train,evaluate,linear-probe,compare,prompts,predict,explain,wise-ft,prepare,synth,pretrain,demo,study} ...

Every user error (missing weights, bad data layout, bad flag value) ends in one line on
stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .train.config import TrainConfig, preset
from .train.faults import TrainingStopped

GET_WEIGHTS = ("convert a checkpoint first: `python -m weights_conversion hf --src HF_DIR --out DIR` "
               "(see README: Real checkpoints)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, choices=["clip", "siglip"], help="loss and protocol preset")
    p.add_argument("--weights", required=True, help="converted checkpoint directory (config.json, model.safetensors)")
    p.add_argument("--data", required=True, help="dataset with train/<class>/ and test/<class>/")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="auto",
                   help="continue from OUT/checkpoint (same flags as the run); `--resume auto`: continue OUT's "
                        "run if it has these options, leave it if finished, start it if OUT holds none")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in OUT")
    # Every field of TrainConfig is a flag; defaults come from the --model preset, shown per preset.
    presets = {name: preset(name) for name in ("clip", "siglip")}
    for f in fields(TrainConfig):
        if f.name in ("model", "synthetic"):
            continue
        flag = "--" + f.name.replace("_", "-")
        values = {name: getattr(cfg, f.name) for name, cfg in presets.items()}
        shown = (f"clip and siglip: {values['clip']}" if values["clip"] == values["siglip"]
                 else f"clip: {values['clip']}, siglip: {values['siglip']}")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"({shown})")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=None, help=f"({shown})")


def train_config_from(args) -> TrainConfig:
    cfg = preset(args.model)
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name != "model":
            setattr(cfg, f.name, value)
    return cfg


def class_names_from(spec: str | None) -> list[str]:
    from pathlib import Path

    from .data.folders import find_classes
    from .data.classes import CLASS_NAMES

    if spec is None:
        return list(CLASS_NAMES)
    if Path(spec).is_dir():
        return find_classes(Path(spec) / "train")
    return [c.strip() for c in spec.split(",") if c.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m har_ref", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    add_train_args(sub.add_parser("train", help="fine-tune CLIP or SigLIP end-to-end on HAR folders"))

    p = sub.add_parser("evaluate", help="score the test split: metrics.json, predictions.csv, confusion.png")
    p.add_argument("--weights", required=True, help="converted checkpoint or run directory")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", default=None, help="template bank or best_prompts.json")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--shift-split", default="test_shift", help="also score DATA/<this>/ when it exists, into "
                                                               "metrics_shift.json ('' never)")

    p = sub.add_parser("linear-probe", help="logistic regression on frozen image embeddings (CLIP sec. 3.2), "
                                            "C chosen on a validation part of train; writes a run like evaluate")
    p.add_argument("--weights", required=True, help="converted checkpoint or run directory")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shift-split", default="test_shift", help="also score DATA/<this>/ when it exists, into "
                                                               "metrics_shift.json ('' never)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each class's train images that "
                                                                   "chooses C")
    p.add_argument("--seed", type=int, default=0, help="draws the validation part")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)

    p = sub.add_parser("compare", help="report comparing two run directories (e.g. CLIP and SigLIP); "
                                       "differences are A - B, the verdict lines B - A")
    p.add_argument("run_a", help="run directory A (e.g. runs/clip)")
    p.add_argument("run_b", help="run directory B (e.g. runs/siglip)")
    p.add_argument("--out", required=True)
    p.add_argument("--resamples", type=int, default=10_000, help="paired bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("prompts", help="per-class prompt ablation on a validation slice of train/")
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("predict", help="top-k classes of image files or folders, with each model's probabilities")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively, hidden files skipped)")
    p.add_argument("--weights", required=True, action="append", help="checkpoint or run directory (repeatable)")
    p.add_argument("--classes", default=None, help="a dataset directory (its train/ folders name the classes) "
                                                   "or a comma-separated list; default: the run's classes.json, "
                                                   "else the 15 HAR classes")
    p.add_argument("--prompts", default=None, help="template bank or best_prompts.json; default: the run's "
                                                   "prompts.json, else the packaged one")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", default=None, metavar="PATH", help="also write JSON lines here; - for stdout "
                                                                "(then stdout holds JSON only)")
    p.add_argument("--batch-size", type=int, default=32, help="images decoded and embedded at a time")
    p.add_argument("--true", default=None, help="the true class, to colour the panel")
    p.add_argument("--panel", default=None, help="write the compare_viz panel PNG here")

    p = sub.add_parser("explain", help="one PNG per image: each model's attention maps over it and its top-3 classes")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively, hidden files skipped)")
    p.add_argument("--weights", required=True, action="append", help="checkpoint or run directory (repeatable)")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--class", dest="explain_classes", action="append", default=None, metavar="CLASS",
                   help="also draw each model's map for this class's score (repeatable)")
    p.add_argument("--classes", default=None, help="label space, as for predict")
    p.add_argument("--prompts", default=None, help="template bank, as for predict")
    p.add_argument("--batch-size", type=int, default=32, help="images decoded and explained at a time")

    p = sub.add_parser("wise-ft", help="weight-space ensemble of a zero-shot checkpoint and its fine-tuned run")
    p.add_argument("--zero-shot", required=True, help="the checkpoint the run was fine-tuned from")
    p.add_argument("--fine-tuned", required=True, help="the fine-tuned run directory (or checkpoint)")
    p.add_argument("--alpha", required=True, type=float, help="0 = zero-shot, 1 = fine-tuned")
    p.add_argument("--out", required=True)

    p = sub.add_parser("prepare", help="flat image folder + CSV -> stratified train/ test/ folders (links)")
    p.add_argument("--csv", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--test-per-class", type=int, default=126)
    p.add_argument("--seed", type=int, default=0)

    from .demo import synthetic  # its defaults are the demo's world

    p = sub.add_parser("synth", help="draw the demo's synthetic HAR-like world: train/, test/, test_shift/ "
                                     "and boxes.json (see har_ref/demo/synthetic.py)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--train-per-class", type=int, default=synthetic.TRAIN_PER_CLASS, help="training images")
    p.add_argument("--test-per-class", type=int, default=synthetic.TEST_PER_CLASS, help="test images")
    p.add_argument("--shift-per-class", type=int, default=None,
                   help="images of the shifted test split (None: as many as --test-per-class; 0: no test_shift/)")
    p.add_argument("--image-size", type=int, default=synthetic.IMAGE_SIZE, help="pixels, square")
    p.add_argument("--variation", type=float, default=synthetic.VARIATION,
                   help="strength of the nuisances, 0 (the tiny models' pretraining world) to 1")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--overwrite", action="store_true", help="replace the splits and boxes.json already in OUT")

    p = sub.add_parser("pretrain", help="pretrain the demo's tiny CLIP and SigLIP on synthetic image-caption pairs")
    p.add_argument("--out", default=None, help="default: har_ref/demo/checkpoints (what the demo starts from)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("demo", help="offline demo: pretrained tiny CLIP and SigLIP, zero-shot, fine-tune, report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("study", help="run a TOML plan of cells x seeds (each an ordinary run) and report every cell "
                                     "against the baseline (har_ref/study/plan.py; the shipped plan of the study's "
                                     "claims: har_ref/study/claims.toml)")
    p.add_argument("plan", help="the plan (TOML)")
    p.add_argument("--out", required=True, help="study directory: DIR/<cell>/seed<k>/, report.md, study.json")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one thread each")
    p.add_argument("--print-commands", action="store_true",
                   help="print one shell command per run (each safe to re-run) for a scheduler, and run nothing")
    p.add_argument("--report-only", action="store_true", help="run nothing: report the finished runs in DIR")
    return parser


def run(args) -> None:
    if args.command == "train":
        from .train.loop import train
        if args.resume not in (True, False, "auto"):
            raise ValueError(f"--resume takes no value or auto, got {args.resume!r}.")
        train(train_config_from(args), args.weights, args.data, args.out, resume=args.resume,
              overwrite=args.overwrite)
    elif args.command == "evaluate":
        from .eval.evaluate import evaluate
        m = evaluate(args.weights, args.data, args.out, args.prompts, args.batch_size, args.workers,
                     shift_split=args.shift_split)
        print(f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  ECE {m['ece']:.4f} -> {args.out}")
        if "shift" in m:
            print(f"{args.shift_split}: accuracy {m['shift']['accuracy']:.4f}  macro-F1 {m['shift']['macro_f1']:.4f}")
    elif args.command == "linear-probe":
        from .eval.linear_probe import linear_probe
        m = linear_probe(args.weights, args.data, args.out, args.shift_split, args.seed, args.val_fraction,
                         args.batch_size, args.workers)
        probe = m["linear_probe"]
        chosen = next(r for r in probe["grid"] if r["C"] == probe["C"])
        print(f"C={probe['C']:g} (validation macro-F1 {chosen['val_macro_f1']:.4f} on {probe['val_images']} images; "
              f"refitted on {probe['train_images']})")
        print(f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  ECE {m['ece']:.4f} -> {args.out}")
        if "shift" in m:
            print(f"{args.shift_split}: accuracy {m['shift']['accuracy']:.4f}  macro-F1 {m['shift']['macro_f1']:.4f}")
    elif args.command == "compare":
        from .eval.report import compare_runs
        path = compare_runs(args.run_a, args.run_b, args.out, n_resamples=args.resamples, seed=args.seed)
        print(f"wrote {path}")
    elif args.command == "prompts":
        from .eval.prompt_ablation import ablate_prompts
        ablate_prompts(args.weights, args.data, args.out, val_fraction=args.val_fraction, seed=args.seed,
                       top_k=args.top_k)
        print(f"wrote {args.out}/prompt_ablation.md and {args.out}/best_prompts.json")
    elif args.command == "predict":
        from .eval.predict import run_predict
        run_predict(args.weights, args.images, class_names_from(args.classes) if args.classes else None,
                    args.prompts, args.top_k, args.true, args.panel, args.json, args.batch_size)
    elif args.command == "explain":
        from .eval.explain_viz import run_explain
        run_explain(args.weights, args.images, args.out, args.explain_classes,
                    class_names_from(args.classes) if args.classes else None, args.prompts, args.batch_size)
    elif args.command == "wise-ft":
        from .eval.wise_ft import wise_ft
        print(f"wrote {wise_ft(args.zero_shot, args.fine_tuned, args.alpha, args.out)}")
    elif args.command == "prepare":
        from .data.prepare import prepare_splits
        report = prepare_splits(args.csv, args.images, args.out, args.test_per_class, args.seed)
        print(f"wrote {args.out}/train and {args.out}/test; report in {args.out}/prepare_report.json")
        for key, problem in report.items():
            if isinstance(problem, dict) and problem.get("count"):
                print(f"  {key}: {problem['count']} (examples in prepare_report.json)")
                for row in problem["examples"][:20] if key == "invalid_rows" else ():
                    print(f"    line {row['line']}: {row['filename']!r}, label {row['label']!r}: {row['why']}")
        if "note" in report:
            print(f"  note: {report['note']}")
    elif args.command == "synth":
        from .demo.synthetic import generate
        generate(args.out, args.train_per_class, args.test_per_class, args.shift_per_class, args.image_size,
                 args.seed, args.variation, args.overwrite)
        shift = "test_shift and " if args.shift_per_class != 0 else ""
        print(f"wrote {args.out}/train, test, {shift}boxes.json")
    elif args.command == "pretrain":
        from .demo.pretrain import pretrain
        from .demo.tiny import CHECKPOINTS
        pretrain(args.out or CHECKPOINTS, seed=args.seed)
    elif args.command == "demo":
        from .demo.demo import run_demo
        run_demo(args.out, seed=args.seed)
    elif args.command == "study":
        import time
        from pathlib import Path

        from .study.plan import load_plan
        from .study.report import write_report
        from .study.runner import print_commands, run_study
        start, out = time.perf_counter(), Path(args.out)
        plan = load_plan(args.plan)
        if args.print_commands:
            return print_commands(plan, out)
        failures = [] if args.report_only else run_study(plan, out, args.jobs)
        print(f"[study] wrote {write_report(plan, out, start)}, {out / 'study.json'} and the "
              "pictures beside them")
        if failures:
            raise ValueError(f"{len(failures)} run(s) failed, first {failures[0]}; fix it and run the same command "
                             "again (finished runs are kept).")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except FileNotFoundError as e:
        mentions_weights = "config.json" in str(e) or "safetensors" in str(e)
        hint = f"; {GET_WEIGHTS}" if mentions_weights and "weights_conversion" not in str(e) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not the user: a full disk, a permission, a vanished mount
        print(f"error: {e}; check free disk space and the permissions of the paths involved.", file=sys.stderr)
        return 1
    except TrainingStopped as e:
        print(f"error: {e}" if e.exit_code != 130 else str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is in the run directory (continue with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
