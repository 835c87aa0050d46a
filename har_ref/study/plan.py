"""A study plan (TOML) read into checked runs: each cell x seed is one ordinary run directory, DIR/<cell>/seed<k>/.

    seeds = [0, 1, 2]                     # every cell's seeds, unless a cell gives its own
    baseline = "clip"                     # the cell every other one is compared with
    [base]                                # options of `python -m har_ref train`, long names with - or _
    weights = "runs/study/weights/clip"   # paths as written: relative to the directory the study runs from
    data = "runs/study/data"
    epochs = 4
    [[cells]]
    name = "clip"
    [[cells]]
    name = "clip-towers-sigmoid-loss"
    loss = "siglip"
    logit_bias_init = "auto"

A cell has a `name` (a directory name), optionally `kind` (KINDS: "train", the default, runs
`python -m har_ref train`; "zero-shot" runs `python -m har_ref evaluate`; "linear-probe" runs
`python -m har_ref linear-probe`), `seeds` and `reference` (the cell it is a variation of, when that is not
the baseline: the report gives cell - reference too), and options of its command (TOML strings, numbers and
booleans; a boolean turns a switch on or off: augment = false is --no-augment). A train cell's options are [base] with its own on
top; a zero-shot or linear-probe cell takes from [base] only the inputs the commands share (INPUTS). A
zero-shot evaluation has no seed: it runs once, as the first seed. The study sets --out, --seed and
(train) --resume auto, so re-running a run's command is always safe. `model`, train's preset, is the
checkpoint's family (WEIGHTS/config.json) unless the plan gives it.

Every run's command line goes through the CLI's own parser (har_ref/__main__.py::build_parser), and a train
run's options through TrainConfig.validate, before anything runs. A problem is one sentence naming the cell
and the key (PlanError).
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import re
import shlex
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from ..__main__ import GET_WEIGHTS, build_parser, train_config_from
from ..train.config import TrainConfig

KINDS = {"train": "train", "zero-shot": "evaluate", "linear-probe": "linear-probe"}  # kind -> its command
CELL_KEYS = ("name", "kind", "seeds", "reference")  # a cell's keys that are not options of its command
SET_BY_STUDY = ("out", "seed", "resume", "overwrite")  # per run, by the study; never by the plan
INPUTS = ("weights", "data", "shift_split", "prompts", "workers")  # what a zero-shot or linear-probe cell takes from [base]
PLAN_KEYS = ("seeds", "baseline", "base", "cells")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class PlanError(ValueError):
    """A plan the study cannot run, in one sentence naming the cell and the key."""


@dataclass
class Run:
    """One cell x seed: its run directory and the command that makes it."""

    cell: str
    kind: str
    seed: int
    directory: Path
    argv: list[str]  # what follows `python -m har_ref`

    def command(self) -> str:
        """The shell command, safe to re-run (train's --resume auto; evaluate and linear-probe rewrite
        the same files)."""
        return shlex.join(["python", "-m", "har_ref", *self.argv])


@dataclass
class Cell:
    name: str
    kind: str
    seeds: list[int]
    reference: str | None  # the cell it is a variation of (besides the baseline), if the plan names one
    options: dict  # the cell's own options as the plan writes them (keys with _)
    resolved: dict  # every option its runs get but --out and --seed (a train cell: weights, data and TrainConfig)
    arguments: list[str]  # those options as command-line arguments, the command first

    def run(self, out: Path, seed: int) -> Run:
        directory = Path(out) / self.name / f"seed{seed}"
        argv = [*self.arguments, "--out", str(directory)]
        if self.kind != "zero-shot":
            argv += ["--seed", str(seed)]
        if self.kind == "train":
            argv += ["--resume", "auto"]
        return Run(self.name, self.kind, seed, directory, argv)

    def train_config(self, seed: int) -> TrainConfig:
        """A train cell's TrainConfig for one seed, as its run records it in train_config.json."""
        return TrainConfig(**{k: v for k, v in self.resolved.items() if k not in ("weights", "data")}, seed=seed)


@dataclass
class Plan:
    path: Path
    seeds: list[int]
    baseline: str
    cells: list[Cell]

    def cell(self, name: str) -> Cell:
        return next(c for c in self.cells if c.name == name)

    def runs(self, out: str | Path) -> list[Run]:
        """Every run, seed by seed (all cells' first seed, then the second, ...): a study stopped half-way
        has whole seeds to report."""
        order = sorted({s for c in self.cells for s in c.seeds})
        return [cell.run(Path(out), seed) for seed in order for cell in self.cells if seed in cell.seeds]


def load_plan(path: str | Path) -> Plan:
    """PATH read and checked; PlanError (one sentence) if anything in it would not run."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: no such plan file; pass a TOML plan such as har_ref/study/claims.toml.")
    try:
        plan = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{path} is not valid TOML ({e}); fix the line it names.") from None
    unknown = [k for k in plan if k not in PLAN_KEYS]
    if unknown:
        raise PlanError(f"{path}: unknown top-level key {unknown[0]!r}; a plan has {', '.join(PLAN_KEYS)}.")
    seeds = check_seeds(plan.get("seeds", [0]), f"{path}: key 'seeds'")
    base = plan.get("base", {})
    cells = plan.get("cells")
    if not isinstance(base, dict):
        raise PlanError(f"{path}: 'base' must be a table ([base]) of train options.")
    if not isinstance(cells, list) or not cells or not all(isinstance(c, dict) for c in cells):
        raise PlanError(f"{path}: the plan needs at least one [[cells]] table.")
    train_options = options_of("train")
    for key in base:
        check_option(f"{path}: [base], key {key!r}", normalized(key), train_options)
    base = {normalized(k): v for k, v in base.items()}
    checked, names = [], set()
    for number, cell in enumerate(cells, start=1):
        name = cell.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise PlanError(f"{path}: cell {number}, key 'name': {name!r} is not a directory name; give each "
                            "cell a name of letters, digits, '-', '_' and '.'.")
        if name in names:
            raise PlanError(f"{path}: cell {name!r}, key 'name': two cells are named {name!r}; give each its own name.")
        names.add(name)
        checked.append(resolve_cell(path, cell, base, seeds))
    baseline = plan.get("baseline", checked[0].name)
    if baseline not in names:
        raise PlanError(f"{path}: key 'baseline': {baseline!r} is not the name of a cell; name one of "
                        f"{', '.join(sorted(names))}.")
    for cell in checked:
        if cell.reference is not None and (cell.reference not in names or cell.reference == cell.name):
            raise PlanError(f"{path}: cell {cell.name!r}, key 'reference': {cell.reference!r} is not the name of "
                            f"another cell; name one of {', '.join(sorted(names - {cell.name}))}.")
    return Plan(path, seeds, baseline, checked)


def check_seeds(seeds, where: str) -> list[int]:
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise PlanError(f"{where}: {seeds!r} is not a list of distinct seeds; write e.g. seeds = [0, 1, 2].")
    return seeds


def normalized(key: str) -> str:
    return key.replace("-", "_")


@contextlib.contextmanager
def quiet():
    with contextlib.redirect_stderr(io.StringIO()) as err:
        yield err


def options_of(command: str) -> dict[str, argparse.Action]:
    """The options of `python -m har_ref COMMAND`, by destination, from the CLI's own parser."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[command]._actions if a.option_strings and a.dest != "help"}


def check_option(where: str, key: str, options: dict[str, argparse.Action], command: str = "train") -> None:
    if key in SET_BY_STUDY:
        raise PlanError(f"{where}: the study sets --{key.replace('_', '-')} itself (runs go to DIR/<cell>/seed<k>, "
                        "seeds come from 'seeds', and every run resumes when it can); remove the key.")
    if key not in options:
        close = difflib.get_close_matches(key, list(options), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see `python -m har_ref " + command + " --help`"
        raise PlanError(f"{where}: not an option of `python -m har_ref {command}`; {hint}")


def arguments_for(where: str, key: str, value, action: argparse.Action) -> list[str]:
    """One plan value as command-line arguments, e.g. epochs = 4 -> --epochs 4, augment = false -> --no-augment."""
    flag = action.option_strings[0]
    switch = isinstance(action, argparse.BooleanOptionalAction)
    if switch or action.nargs == 0:
        if not isinstance(value, bool):
            raise PlanError(f"{where}: {flag} is a switch, so the value must be true or false, not {value!r}.")
        return [flag] if value else [f"--no-{flag[2:]}"] if switch else []
    if isinstance(value, (bool, list, dict)):
        raise PlanError(f"{where}: {flag} takes one value (a string or a number), not {value!r}.")
    return [flag, str(value)]


def resolve_cell(path: Path, cell: dict, base: dict, seeds: list[int]) -> Cell:
    """One [[cells]] table: its kind, seeds, options (over [base]) and command line, checked by the CLI's parser."""
    name = cell["name"]
    where = f"{path}: cell {name!r}"
    kind = cell.get("kind", "train")
    if kind not in KINDS:
        raise PlanError(f"{where}, key 'kind': {kind!r} is not a kind of cell; use one of {', '.join(KINDS)}.")
    command = KINDS[kind]
    cell_seeds = check_seeds(cell["seeds"], f"{where}, key 'seeds'") if "seeds" in cell else seeds
    if kind == "zero-shot":
        if len(cell_seeds) > 1 and "seeds" in cell:
            raise PlanError(f"{where}, key 'seeds': a zero-shot evaluation does not depend on a seed; give it one "
                            "(seeds = [0]) or none.")
        cell_seeds = cell_seeds[:1]
    options = options_of(command)
    own = {normalized(k): v for k, v in cell.items() if k not in CELL_KEYS}
    for key in [k for k in cell if k not in CELL_KEYS]:
        check_option(f"{where}, key {key!r}", normalized(key), options, command)
    inherited = base if kind == "train" else {k: v for k, v in base.items() if k in INPUTS and k in options}
    merged = {**inherited, **own}
    origin = {k: f"{where}, key {k!r}" + ("" if k in own else " (from [base])") for k in merged}
    for key, action in options.items():
        if action.required and key not in merged and key not in SET_BY_STUDY + ("model",):
            raise PlanError(f"{where}, key {key!r}: missing; `python -m har_ref {command}` needs "
                            f"--{key.replace('_', '-')}: give it in [base] or in the cell.")
    if kind == "train" and "model" not in merged:  # the protocol preset of the checkpoint's towers
        merged = {"model": checkpoint_family(origin["weights"], merged["weights"]), **merged}
        origin["model"] = origin["weights"]
    arguments = [command]
    for key, value in merged.items():
        arguments += arguments_for(origin[key], key, value, options[key])
    args = parse(arguments + ["--out", "OUT"], origin, options)
    resolved = {k: v for k, v in vars(args).items() if k not in ("command", *SET_BY_STUDY)}
    if kind == "train":
        config = train_config_from(args)
        try:
            config.validate()
        except ValueError as e:
            raise PlanError(f"{origin.get(key_named_in(str(e), merged), where)}: {e}") from None
        resolved = {"weights": args.weights, "data": args.data,
                    **{k: v for k, v in asdict(config).items() if k != "seed"}}
    return Cell(name, kind, cell_seeds, cell.get("reference"), own, resolved, arguments)


def checkpoint_family(where: str, weights) -> str:
    config = Path(weights) / "config.json"
    if not config.is_file():
        raise PlanError(f"{where}: {config} not found, so the towers (train's --model) are unknown; "
                        f"{GET_WEIGHTS}, or give the cell a model.")
    return json.loads(config.read_text())["family"]


def parse(arguments: list[str], origin: dict[str, str], options: dict[str, argparse.Action]):
    """The command line through the CLI's parser; its complaint becomes a PlanError naming the key."""
    with quiet() as err:
        try:
            return build_parser().parse_args(arguments)
        except SystemExit:
            complaint = err.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
    key = key_named_in(complaint, origin)
    where = origin.get(key, next(iter(origin.values())).split(", key")[0])
    raise PlanError(f"{where}: `python -m har_ref {arguments[0]}` refuses it ({complaint}); fix the value.")


def key_named_in(message: str, keys) -> str | None:
    """The first of `keys` whose flag the message names (the CLI's errors name the flag they are about)."""
    named = [normalized(flag[2:]) for flag in re.findall(r"--[a-z][a-z0-9-]*", message)]
    return next((k for k in named if k in keys), None)
