"""The reading guide (docs/*.md) cites code as `path.py`, `path.py::name` or `path.py::Class.method`.

Every such reference must name an existing file and, after `::`, a function, class, method,
class attribute or module-level constant defined there. Files are parsed with `ast`, never
imported, so this runs in milliseconds and a renamed function fails here instead of leaving
learners a dead reference.
"""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Any token ending in ".py", optionally followed by "::" and a dotted Python name. Not limited to
# backticks: a bare "layers.py" in prose is a reference too, and must be written from the root.
REFERENCE = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.py)(?:::([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*))?")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def find_references(text: str) -> list[tuple[str, str | None]]:
    """(file path, dotted name or None) for every code reference in a markdown text."""
    return [(m.group(1), m.group(2)) for m in REFERENCE.finditer(text)]


@functools.lru_cache(maxsize=None)
def _module(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _names_defined_in(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Functions, classes and assigned names at one level of a module or class body."""
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            names.update((t.id, node) for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return names


def check_reference(path: str, name: str | None, root: Path = ROOT) -> str | None:
    """None if `path` exists under `root` and defines `name` (dotted through classes); else why not."""
    file = root / path
    if not file.is_file():
        return f"{path} does not exist"
    if name is None:
        return None
    node: ast.AST = _module(file.resolve())
    for depth, part in enumerate(name.split(".")):
        if not isinstance(node, (ast.Module, ast.ClassDef)):
            return f"{path}::{'.'.join(name.split('.')[:depth])} is not a class, so it has no {part!r}"
        found = _names_defined_in(node.body).get(part)
        if found is None:
            where = path if depth == 0 else f"{path}::{'.'.join(name.split('.')[:depth])}"
            return f"{where} defines no {part!r}"
        node = found
    return None


def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def test_guide_exists_with_an_index():
    assert (DOCS / "README.md").is_file(), "docs/README.md (the guide's index) is missing"
    index = (DOCS / "README.md").read_text()
    for page in doc_pages():
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not link {page.name}"


def test_every_code_reference_resolves():
    problems, count = [], 0
    for page in doc_pages():
        for line_number, line in enumerate(page.read_text().splitlines(), start=1):
            for path, name in find_references(line):
                count += 1
                problem = check_reference(path, name)
                if problem:
                    problems.append(f"docs/{page.name}:{line_number}: {path}{'::' + name if name else ''}: {problem}")
    assert count >= 50, f"only {count} code references found in docs/*.md; is the pattern still matching?"
    assert not problems, "dead code references in the docs:\n" + "\n".join(problems)


def test_checker_flags_made_up_references():
    text = "see `har_ref/data/prompts.py::PromptSampler.sample`, `har_ref/train/xbm.py` and har_ref/train/losses.py::clip_loss."
    assert find_references(text) == [("har_ref/data/prompts.py", "PromptSampler.sample"), ("har_ref/train/xbm.py", None),
                                     ("har_ref/train/losses.py", "clip_loss")]
    assert find_references("a bare layers.py in prose") == [("layers.py", None)]
    # real ones resolve: function, method, constant, dataclass field, test function
    for path, name in [("har_ref/train/losses.py", "clip_loss"), ("har_ref/data/prompts.py", "PromptSampler.sample"),
                       ("har_ref/train/losses.py", "MAX_LOGIT_SCALE"), ("har_ref/train/config.py", "TrainConfig.xbm_warmup_steps"),
                       ("tests/test_losses.py", "naive_clip_loss"), ("har_ref/train/xbm.py", None)]:
        assert check_reference(path, name) is None, (path, name)
    # made-up ones are flagged, each with a reason
    for path, name in [("har_ref/train/losses.py", "clip_los"), ("har_ref/data/prompts.py", "PromptSampler.samplee"),
                       ("har_ref/data/prompts.py", "PromptSampler.sample.inner"), ("har_ref/no_such_module.py", None),
                       ("layers.py", None), ("har_ref/train/xbm.py", "CrossBatchMemory.enqueue.x")]:
        assert check_reference(path, name), (path, name)


def test_relative_links_between_pages_resolve():
    broken = [f"docs/{page.name}: ({target})" for page in doc_pages()
              for target in MARKDOWN_LINK.findall(page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert not broken, "broken links in the docs:\n" + "\n".join(broken)


def test_readme_links_the_guide():
    assert re.search(r"\]\(docs/[^)]*\)", (ROOT / "README.md").read_text()), \
        "README.md should link the reading guide, e.g. [docs/](docs/README.md)"
