"""Every reference a reader follows resolves: in README.md, docs/*.md, and the comments and docstrings
of har_ref/ and weights_conversion/.

What counts as a reference, and what it must resolve to:
- a file (`.py`, `.json`, `.md`, `.toml`): it exists. Markdown writes it from the repository root (a page
  may also name a page beside it); a comment may also write it from its own folder or its package's root.
- `path.py::name`, `path.py::Class.member`: the file defines it (read with `ast`, never imported).
- `Class.member` for a class of the package; in comments also `module.name` for a module of the package
  (`loop.cached_step`): the class, or the module or one of its classes, defines it.
- a flag `--flag`: after `python -m har_ref CMD`, `python -m weights_conversion CMD` or `make train` it is an
  option of that command's parser (har_ref/__main__.py::build_parser, weights_conversion/__main__.py::build_parser);
  after `python path/script.py` an option that script adds; anywhere else an option of some command.
- `make TARGET VAR=...` in code: the Makefile has the target and the variable.
Files a run writes and other programs' flags are not in the tree: they are listed, once, in NOT_IN_THE_TREE.
"""
from __future__ import annotations

import argparse
import ast
import functools
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGES = ("har_ref", "weights_conversion")
SOURCE_DIRS = PACKAGES + ("tests", "docs")  # a path starting here names a file of this repository

# The one list of references that are not to this tree. Everything else must resolve.
NOT_IN_THE_TREE = frozenset({
    # Files a run, a conversion, `prepare`, `synth`, `pretrain` or a benchmark writes into its output
    # directory (named alone or under a placeholder such as OUT/ or runs/demo/; `har_ref/...` paths must exist).
    "config.json", "train_config.json", "classes.json", "prompts.json", "metrics.json", "metrics_shift.json",
    "comparison.json", "wise_ft_curve.json", "summary.json", "manifest.json",
    "prepare_report.json", "prompt_ablation.json", "best_prompts.json", "report.md", "prompt_ablation.md",
    "pointing_game.json", "bench.json", "boxes.json", "study.json",
    # ... and the tokenizer / processor files of a transformers checkpoint directory.
    "vocab.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "preprocessor_config.json", "processor_config.json",
    # Other projects' files, always written with the project's name first.
    "open_clip/", "big_vision/",
    # Other programs' flags: torchrun's, and open_clip's training script's.
    "--nproc_per_node", "--accum-freq",
})

FILE_REF = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w-]+\.(?:py|json|md|toml))(?![\w/-])"
                      r"(?:::([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*))?")
DOTTED = re.compile(r"(?<![\w./:-])([A-Za-z_]\w*)((?:\.[A-Za-z_]\w*)+)(?![\w/-])")
NOT_A_NAME = {"py", "json", "jsonl", "md", "toml", "csv", "png", "txt", "gz", "safetensors", "pt", "bin",
              "model", "u8", "tmp", "old", "jpg"}  # `x.json`, `checkpoint.tmp`: a file, not a name
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")
COMMAND = re.compile(r"-m\s+(har_ref|weights_conversion)\b(?:\s+([a-z][\w-]*))?"
                     r"|\bpython[\d.]*\s+((?:[\w.-]+/)*[\w-]+\.py)\b|\b(torchrun|pip|pytest)\b|\bmake\s+([a-z][\w-]*)")
MAKE_CALL = re.compile(r"\bmake\s+([a-z][\w-]*)((?:\s+[A-Z][A-Z_]*=\S+)*)")
CODE_SPAN = re.compile(r"`([^`]+)`")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s#]+)(?:#([^)]*))?\)")


# ---------------------------------------------------------------------------- the tree, read once


@functools.lru_cache(maxsize=None)
def _module(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _members(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Functions, classes and assigned names at one level of a module or class body."""
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):  # also `A, B = 1, 2`
            names.update((t.id, node) for target in node.targets for t in ast.walk(target) if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return names


@functools.lru_cache(maxsize=None)
def _class_members(cls: ast.ClassDef) -> dict[str, ast.AST]:
    """A class's body names plus the attributes its methods set on self (`self.patch_embed = ...`)."""
    names = _members(cls.body)
    for node in ast.walk(cls):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                names.setdefault(t.attr, node)
    return names


def _lookup(scope: ast.AST, dotted: str, scope_name: str) -> str | None:
    """None if `dotted` is defined in `scope` (a module or class, through nested classes); else why not."""
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        where = scope_name + ("::" if scope_name.endswith(".py") else ".") + ".".join(parts[:depth]) if depth else scope_name
        if isinstance(scope, ast.Module):
            found = _members(scope.body).get(part)
        elif isinstance(scope, ast.ClassDef):
            found = _class_members(scope).get(part)
        else:
            return f"{where} is not a class, so it has no {part!r}"
        if found is None:
            return f"{where} defines no {part!r}"
        scope = found
    return None


@functools.lru_cache(maxsize=None)
def package_files() -> tuple[Path, ...]:
    return tuple(sorted(f for p in PACKAGES for f in (ROOT / p).rglob("*.py")))


@functools.lru_cache(maxsize=None)
def package_modules() -> dict[str, list[ast.Module]]:
    """Module stem -> parsed modules (two `config.py` share a stem)."""
    stems: dict[str, list[ast.Module]] = {}
    for f in package_files():
        stems.setdefault(f.stem, []).append(_module(f))
    return stems


@functools.lru_cache(maxsize=None)
def package_classes() -> dict[str, list[ast.ClassDef]]:
    classes: dict[str, list[ast.ClassDef]] = {}
    scopes = [_module(f) for f in package_files()]
    while scopes:  # module bodies and, inside them, class bodies: classes are not defined in functions here
        for node in scopes.pop().body:
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, []).append(node)
                scopes.append(node)
    return classes


@functools.lru_cache(maxsize=None)
def typed_attributes() -> dict[str, set[str]]:
    """Attribute name -> the package classes its annotations name (`vision: VisionConfig` in ModelConfig), so
    that `vision.image_size` resolves through the field's type."""
    types: dict[str, set[str]] = {}
    for classes in package_classes().values():
        for cls in classes:
            for node in cls.body:
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    named = {n.id for n in ast.walk(node.annotation) if isinstance(n, ast.Name)}
                    named |= {n.value for n in ast.walk(node.annotation) if isinstance(n, ast.Constant)}
                    types.setdefault(node.target.id, set()).update(t for t in named if t in package_classes())
    return types


def _flags_of(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    """Subcommand -> its option strings."""
    commands = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                commands[name] = {s for a in sub._actions for s in a.option_strings}
    return commands


@functools.lru_cache(maxsize=None)
def cli_flags() -> dict[str, dict[str, set[str]]]:
    """{"har_ref": {command: flags}, "weights_conversion": {command: flags}}, from the parsers themselves."""
    from har_ref.__main__ import build_parser as har_ref_parser
    from weights_conversion.__main__ import build_parser as conversion_parser

    return {"har_ref": _flags_of(har_ref_parser()), "weights_conversion": _flags_of(conversion_parser())}


@functools.lru_cache(maxsize=None)
def script_flags(path: Path) -> frozenset[str]:
    """The `--options` a script passes to add_argument, read with ast."""
    return frozenset(arg.value for node in ast.walk(_module(path)) if isinstance(node, ast.Call)
                     and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
                     for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("-"))


@functools.lru_cache(maxsize=None)
def makefile() -> tuple[frozenset[str], frozenset[str]]:
    """(targets, variables) of the Makefile."""
    text = (ROOT / "Makefile").read_text()
    targets = {t for line in re.findall(r"^([\w .-]+):(?!=)", text, re.M) for t in line.split()}
    return frozenset(targets), frozenset(re.findall(r"^([A-Z][A-Z_]*)\s*[?:]?=", text, re.M))


# ---------------------------------------------------------------------------- checks


def check_reference(path: str, name: str | None, root: Path = ROOT) -> str | None:
    """None if `path` exists under `root` and defines `name` (dotted through classes); else why not."""
    file = root / path
    if not file.is_file():
        return f"{path} does not exist"
    if name is None:
        return None
    if file.suffix != ".py":
        return f"{path} is not a Python file, so it defines no {name!r}"
    return _lookup(_module(file.resolve()), name, path)


def _exempt_file(path: str) -> bool:
    parts = path.split("/")
    return (any(path.startswith(p) for p in NOT_IN_THE_TREE if p.endswith("/"))
            or (parts[-1] in NOT_IN_THE_TREE and parts[0] not in SOURCE_DIRS))


def _check_dotted(first: str, rest: str, modules_too: bool) -> str | None | bool:
    """False if `first.rest` is not a reference to check; None if it resolves (in the class, or the module
    or one of its classes, or the type of a field named `first`); else why not."""
    if rest.rsplit(".", 1)[-1] in NOT_A_NAME:
        return False
    classes = package_classes().get(first, [])
    modules = package_modules().get(first, []) if modules_too else []
    if not classes and not modules:
        return False
    field_types = [c for name in typed_attributes().get(first, ()) for c in package_classes()[name]]
    scopes = classes + modules + [c for m in modules for c in m.body if isinstance(c, ast.ClassDef)] + field_types
    problems = [_lookup(scope, rest[1:], first) for scope in scopes]
    return None if None in problems else f"{first}{rest}: no class or module named {first!r} defines {rest[1:]!r}"


def _flag_problems(text: str, where: str) -> list[str]:
    """Each --flag checked against the command it follows on the line (see the module docstring)."""
    commands = list(COMMAND.finditer(text))
    flags = cli_flags()
    problems = []
    for m in commands:
        package, command = m.group(1), m.group(2)
        if package and command and command not in flags[package]:
            problems.append(f"{where}: `python -m {package} {command}`: no such command")
    for m in FLAG.finditer(text):
        flag = m.group(0)
        if flag in NOT_IN_THE_TREE:
            continue
        before = [c for c in commands if c.end() <= m.start()]
        owner = before[-1] if before else None
        if owner is None or owner.group(4) or (owner.group(5) and owner.group(5) != "train"):
            allowed = {f for package in flags.values() for command in package.values() for f in command}
            owner_name = "any har_ref or weights_conversion command"
        elif owner.group(3):  # a script
            script = ROOT / owner.group(3)
            allowed = script_flags(script) if script.is_file() else set()
            owner_name = owner.group(3)
        elif owner.group(5):  # make train ARGS="..."
            allowed, owner_name = flags["har_ref"]["train"], "python -m har_ref train"
        else:
            package, command = owner.group(1), owner.group(2)
            if command in flags[package]:
                allowed, owner_name = flags[package][command], f"python -m {package} {command}"
            else:
                allowed = {f for c in flags[package].values() for f in c}
                owner_name = f"python -m {package}"
        if flag not in allowed:
            problems.append(f"{where}: {flag}: not an option of {owner_name}")
    return problems


def _make_problems(code: str, where: str) -> list[str]:
    targets, variables = makefile()
    problems = []
    for m in MAKE_CALL.finditer(code):
        if m.group(1) not in targets:
            problems.append(f"{where}: `make {m.group(1)}`: the Makefile has no such target")
        for var in re.findall(r"([A-Z][A-Z_]*)=", m.group(2)):
            if var not in variables:
                problems.append(f"{where}: make {var}=: the Makefile has no such variable")
    return problems


def reference_problems(text: str, where: str, file_bases: list[Path], modules_too: bool, code: str) -> list[str]:
    """Every reference in `text` that does not resolve. `file_bases`: the folders a relative file name may be
    written from; `modules_too`: check `module.name` as well as `Class.member`; `code`: the text's code
    (backtick spans, or the whole line in a code block), where `make` lines are read."""
    problems = []
    for m in FILE_REF.finditer(text):
        path, name = m.group(1), m.group(2)
        if _exempt_file(path) and name is None:
            continue
        bases = [b for b in file_bases if (b / path).is_file()]
        if not bases:
            problems.append(f"{where}: {m.group(0)}: {path} does not exist")
            continue
        problem = check_reference(str((bases[0] / path).relative_to(ROOT)), name)
        if problem:
            problems.append(f"{where}: {m.group(0)}: {problem}")
    scrubbed = FILE_REF.sub(" ", text)  # `losses.py::clip_loss` is checked above, not as a dotted name
    for m in DOTTED.finditer(scrubbed):
        problem = _check_dotted(m.group(1), m.group(2), modules_too)
        if problem:
            problems.append(f"{where}: {problem}")
    return problems + _flag_problems(text, where) + _make_problems(code, where)


# ---------------------------------------------------------------------------- the texts


def markdown_lines(path: Path) -> list[tuple[int, str, str]]:
    """(line number, text, code) per logical line: a code block's lines joined at a trailing backslash."""
    lines, in_block, pending = [], False, None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if pending:
            start, joined = pending
            line, number = joined + " " + line, start
            pending = None
        if in_block and line.rstrip().endswith("\\"):
            pending = (number, line.rstrip()[:-1])
            continue
        lines.append((number, line, line if in_block else " ".join(CODE_SPAN.findall(line))))
    return lines


def markdown_problems(path: Path) -> list[str]:
    bases = [ROOT] if path.parent == ROOT else [ROOT, path.parent]
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return [p for number, text, code in markdown_lines(path)
            for p in reference_problems(text, f"{where}:{number}", bases, modules_too=False, code=code)]


@functools.lru_cache(maxsize=None)
def comments_and_docstrings(path: Path) -> list[tuple[int, str]]:
    """(line number, text) for every comment (tokenize) and docstring line (ast) of a Python file."""
    texts = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(_module(path)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                texts += [(node.body[0].lineno + i, line) for i, line in enumerate(doc.splitlines())]
    return sorted(texts)


def code_problems(path: Path, package_root: Path) -> list[str]:
    bases = [path.parent, package_root, ROOT]
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return [p for number, text in comments_and_docstrings(path)
            for p in reference_problems(text, f"{where}:{number}", bases, modules_too=True,
                                        code=" ".join(CODE_SPAN.findall(text)))]


def markdown_files() -> list[Path]:
    return [ROOT / "README.md"] + sorted(DOCS.glob("*.md"))


# ---------------------------------------------------------------------------- tests


def test_guide_exists_with_an_index():
    assert (DOCS / "README.md").is_file(), "docs/README.md (the guide's index) is missing"
    index = (DOCS / "README.md").read_text()
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "README.md":
            assert f"]({page.name}" in index, f"docs/README.md does not link {page.name}"


def test_every_reference_in_the_markdown_resolves():
    problems = [p for page in markdown_files() for p in markdown_problems(page)]
    count = sum(len(FILE_REF.findall(text)) for page in markdown_files() for _, text, _ in markdown_lines(page))
    assert count >= 150, f"only {count} file references found in the markdown; is the pattern still matching?"
    assert not problems, "dead references in README.md and docs/:\n" + "\n".join(problems)


def test_every_reference_in_comments_and_docstrings_resolves():
    problems = [p for f in package_files() for p in code_problems(f, ROOT / f.relative_to(ROOT).parts[0])]
    assert len(package_files()) >= 40
    assert not problems, "dead references in comments and docstrings:\n" + "\n".join(problems)


def test_every_exemption_is_used():
    """An entry nothing refers to any more is dead weight that would hide a future mistake."""
    texts = [text for page in markdown_files() for _, text, _ in markdown_lines(page)]
    texts += [text for f in package_files() for _, text in comments_and_docstrings(f)]
    found = {m.group(1).split("/")[-1] for t in texts for m in FILE_REF.finditer(t)}
    found |= {flag for t in texts for flag in FLAG.findall(t)}
    unused = [e for e in NOT_IN_THE_TREE
              if e not in found and not (e.endswith("/") and any(e in t for t in texts))]
    assert not unused, f"NOT_IN_THE_TREE lists entries no text uses: {sorted(unused)}"


def test_checker_finds_each_form_of_reference():
    text = ("see `har_ref/data/prompts.py::PromptSampler.sample`, `har_ref/train/xbm.py`, har_ref/data/prompts.json"
            " and har_ref/train/losses.py::clip_loss; a bare layers.py; pyproject.toml; docs/demo.md.")
    assert [(m.group(1), m.group(2)) for m in FILE_REF.finditer(text)] == [
        ("har_ref/data/prompts.py", "PromptSampler.sample"), ("har_ref/train/xbm.py", None),
        ("har_ref/data/prompts.json", None), ("har_ref/train/losses.py", "clip_loss"), ("layers.py", None),
        ("pyproject.toml", None), ("docs/demo.md", None)]
    assert FILE_REF.findall("log.jsonl, model.safetensors, https://example.org/a/b.py") == []
    # real ones resolve: function, method, constant, dataclass field, test function, attribute set on self
    for path, name in [("har_ref/train/losses.py", "clip_loss"), ("har_ref/data/prompts.py", "PromptSampler.sample"),
                       ("har_ref/train/losses.py", "MAX_LOGIT_SCALE"), ("har_ref/train/config.py", "TrainConfig.xbm_warmup_steps"),
                       ("tests/test_losses.py", "naive_clip_loss"), ("har_ref/train/xbm.py", None),
                       ("har_ref/model/vision.py", "VisionTransformer.patch_embed"),
                       ("har_ref/demo/synthetic.py", "VARIATION")]:  # assigned in a tuple
        assert check_reference(path, name) is None, (path, name)
    # made-up ones are flagged, each with a reason
    for path, name in [("har_ref/train/losses.py", "clip_los"), ("har_ref/data/prompts.py", "PromptSampler.samplee"),
                       ("har_ref/data/prompts.py", "PromptSampler.sample.inner"), ("har_ref/no_such_module.py", None),
                       ("layers.py", None), ("har_ref/train/xbm.py", "CrossBatchMemory.enqueue.x"),
                       ("har_ref/data/prompts.json", "templates")]:
        assert check_reference(path, name), (path, name)


BAD_PAGE = """# A page with one mistake per line

A missing function: `har_ref/train/losses.py::no_such_loss`.
A missing method: `CrossBatchMemory.no_such_method`.
A missing file: the prompt bank is `har_ref/prompts.json`.
A missing flag: `python -m har_ref train --no-such-flag`.
A flag of another command: `python -m har_ref evaluate --accum-steps 4`.
A missing command: `python -m har_ref no-such-command`.
A missing script flag: `python tests/bench/bench.py --no-such-option`.

```bash
make train MODEL=clip NO_SUCH_VARIABLE=1
make no-such-target
torchrun --nproc_per_node 2 --no-such-torchrun-flag -m har_ref train --model clip
```
"""

GOOD_PAGE = """# The same references, right

`har_ref/train/losses.py::clip_loss`, `CrossBatchMemory.enqueue`, `har_ref/data/prompts.json`,
`python -m har_ref train --xbm-warmup-steps 10`, `python -m har_ref evaluate --batch-size 8`,
`python tests/bench/bench.py --compile`; a run's `metrics.json` and `runs/demo/report/report.md`.

```bash
make train MODEL=clip ARGS="--accum-steps 16 --no-augment"
.venv/bin/torchrun --nproc_per_node 2 -m har_ref train --model siglip \\
    --accum-mode cached
```
"""


def test_planted_bad_references_fail_the_check(tmp_path):
    bad = tmp_path / "bad.md"
    bad.write_text(BAD_PAGE)
    problems = markdown_problems(bad)
    expected = ["no_such_loss", "no_such_method", "har_ref/prompts.json does not exist", "--no-such-flag",
                "--accum-steps: not an option of python -m har_ref evaluate", "no-such-command",
                "--no-such-option: not an option of tests/bench/bench.py", "NO_SUCH_VARIABLE",
                "make no-such-target", "--no-such-torchrun-flag"]
    for mistake in expected:
        assert sum(mistake in p for p in problems) == 1, (mistake, problems)
    assert len(problems) == len(expected), problems
    good = tmp_path / "good.md"
    good.write_text(GOOD_PAGE)
    assert markdown_problems(good) == []


def test_planted_bad_references_in_comments_fail_the_check(tmp_path):
    module = tmp_path / "module.py"
    module.write_text('"""Reads data.py, as `loop.choose_loss` says (see faults.py and loop.py)."""\n'
                      "# the memory's rows: `CrossBatchMemory.get`, xbm.py; flags --resume and --no-such-flag\n"
                      "# cfg.vision.image_size: vision.image_size is a field of the config's vision part\n"
                      "x = 1\n")
    problems = code_problems(module, ROOT / "har_ref" / "train")
    assert len(problems) == 3, problems
    assert "data.py does not exist" in problems[0] and "choose_loss" in problems[1] and "--no-such-flag" in problems[2]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_and_their_anchors_resolve():
    broken = []
    for page in markdown_files():
        for target, anchor in MARKDOWN_LINK.findall(page.read_text()):
            if "://" in target:
                continue
            file = page.parent / target
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: ({target}) does not exist")
            elif anchor and file.suffix == ".md":
                headings = {_slug(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), re.M)}
                if anchor not in headings:
                    broken.append(f"{page.relative_to(ROOT)}: ({target}#{anchor}): no such heading")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_links_the_guide():
    assert re.search(r"\]\(docs/[^)]*\)", (ROOT / "README.md").read_text()), \
        "README.md should link the reading guide, e.g. [docs/](docs/README.md)"


@pytest.mark.parametrize("text", ["an ordinary sentence with --- in it", "make sure it runs", "x.shape and F.normalize"])
def test_prose_is_not_taken_for_references(text):
    assert reference_problems(text, "here", [ROOT], modules_too=True, code="") == []
