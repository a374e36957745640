"""Every command README.md and docs/ show still parses, and every test, file and Python name they
cite still exists: a renamed option, recipe, model, test or function cannot leave the docs behind.

The commands are read from the fenced code blocks and the inline code of README.md and docs/*.md
(not docs/performance-log.md, a dated record of what was run then). ``spikingformer ...`` (also as
``python -m spikingformer`` or under ``torchrun``) is parsed by the command's own parser, a
``train`` command's recipe and overrides are validated as ``train`` validates them, and every
``--model`` named is looked up in the zoo; ``python benchmarks/NAME.py ...`` is parsed by that
script's parser (the script runs up to its ``parse_args`` and stops there). The citations are
``tests/test_x.py::test_name`` (docs/reliability.md's evidence), repository paths (``benchmarks/...``,
``src/spikingformer/...`` or package-relative as ``csrc/lif_cpu.cpp``, ``.ci/...``) and dotted names
(``spikingformer.data.build_dataset``). docs/recipes.md's table of the recipes' settings is read
against the recipes themselves, and every inline call of a package function or class
(``TonicFrames(dataset, time_steps, split_by="number", pad_to=None)``) must fit its signature,
with the defaults it states where it writes the signature out. The other way round, every
``docs/X.md, "Section"`` that the package's messages and comments send a reader to must exist,
and so must every relative link and heading anchor of the Markdown pages.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import runpy
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from spikingformer.cli import build_parser
from spikingformer.config import load_config, recipe_names
from spikingformer.engine.commands import _overrides
from spikingformer.models import list_models

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "performance-log.md")]

# the words the docs write where a value goes, and the variables of the one documented shell loop
PLACEHOLDERS = {"N": "16", "PATH": "runs/example/best.pt", "NAME": "spikingformer_8_512", "...": None}
SHELL_VARIABLES = {"recipe": "digits", "arch": "spikingformer", "seed": "0"}

FENCED = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def _prose(markdown: Path) -> str:
    """A Markdown file's text without its fenced code blocks."""
    return FENCED.sub("", markdown.read_text(encoding="utf-8"))


def _headings(markdown: Path) -> list[str]:
    return re.findall(r"^#{1,6}\s+(.+?)\s*$", _prose(markdown), re.M)


COMMAND = re.compile(r"^(?:\$\s+)?(?:torchrun\s.*?-m\s+|python3?\s+-m\s+)?(spikingformer\s.*|python3?\s+benchmarks/\S+\.py.*)$")


def _code(text: str) -> list[tuple[str, bool]]:
    """(piece, whole) for the lines of the fenced blocks (continuations joined, a comment's text kept),
    which are whole commands, and for the inline spans, which may leave out required arguments."""
    pieces = []
    for block in FENCED.findall(text):
        block = re.sub(r"\\\n\s*(#\s*)?", " ", block)
        pieces += [(line.strip().lstrip("#").strip(), True) for line in block.splitlines()]
    pieces += [(" ".join(span.split()), False) for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", FENCED.sub("", text))]
    return pieces


def _expand(command: str) -> list[str]:
    command = re.sub(r"\$\{?(\w+)\}?", lambda m: SHELL_VARIABLES.get(m.group(1), m.group(0)), command)
    words = shlex.split(command, comments=True)
    unknown = [w for w in words if "$" in w and not w.startswith("$(")]
    assert not unknown, f"{command!r}: add {unknown} to SHELL_VARIABLES"
    return [PLACEHOLDERS.get(w, w) for w in words if PLACEHOLDERS.get(w, w) is not None]


def documented_commands() -> list[tuple[str, list[str], bool]]:
    """(where and what, its words, whether it is whole) for each distinct documented command."""
    found = {}
    for doc in DOCS:
        for piece, whole in _code(doc.read_text(encoding="utf-8")):
            match = COMMAND.match(piece)
            if match:
                where, was_whole = found.get(match.group(1), (doc.relative_to(ROOT).as_posix(), False))
                found[match.group(1)] = where, was_whole or whole
    return [(f"{where}: {command}", _expand(command), whole) for command, (where, whole) in found.items()]


COMMANDS = documented_commands()
CLI = [(label, words[1:], whole) for label, words, whole in COMMANDS if words[0] == "spikingformer"]
SCRIPTS = [(label, words[1], words[2:]) for label, words, _ in COMMANDS if words[0] != "spikingformer"]


def test_the_docs_show_commands_of_both_kinds():
    # the reader finds what it is meant to find (a broken pattern would make the tests below vacuous)
    assert len(CLI) >= 40 and len(SCRIPTS) >= 15, (len(CLI), len(SCRIPTS))
    subcommands = {argv[0] for _, argv, _ in CLI if argv}
    assert {"train", "eval", "models", "export", "audit", "energy", "fuse", "info"} <= subcommands


def test_the_reader_sees_continuations_comments_placeholders_and_loops():
    text = (
        "```bash\nspikingformer train --config digits \\\n    --epochs 2  # two\n"
        "# runs:\n#   spikingformer energy --checkpoint a.pt \\\n#       --output $recipe\n```\n"
        "and `spikingformer eval --time-steps N`, `torchrun --nproc_per_node=2 -m spikingformer train ...`"
    )
    commands = [_expand(COMMAND.match(p).group(1)) for p, _ in _code(text) if COMMAND.match(p)]
    assert commands == [
        ["spikingformer", "train", "--config", "digits", "--epochs", "2"],
        ["spikingformer", "energy", "--checkpoint", "a.pt", "--output", "digits"],
        ["spikingformer", "eval", "--time-steps", "16"],
        ["spikingformer", "train"],
    ]


def _parser(argv: list[str], whole: bool) -> argparse.ArgumentParser:
    """The command's parser; for a command shown in part (inline, "`spikingformer eval --time-steps N`"),
    with its sub-command's required options made optional."""
    parser = build_parser()
    if not whole and argv and argv[0] in parser.commands.choices:
        for action in parser.commands.choices[argv[0]]._actions:
            action.required = False
    return parser


@pytest.mark.parametrize("label, argv, whole", CLI, ids=[label for label, _, _ in CLI])
def test_documented_command_parses(label, argv, whole, capsys):
    if "--help" in argv:
        with pytest.raises(SystemExit) as exit:
            build_parser().parse_args(argv)
        assert exit.value.code == 0 and "usage: spikingformer" in capsys.readouterr().out
        return
    args = _parser(argv, whole).parse_args(argv)  # an unknown option or choice exits (SystemExit fails the test)
    model = getattr(args, "model", None)
    if model is not None:
        assert model in list_models(), f"{label}: no model {model!r} in the zoo"
    config = getattr(args, "config", None)
    if args.command == "train" and not (config or "").endswith((".yaml", ".yml")):
        load_config(config, _overrides(args))  # the recipe and every override, as train checks them


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("label, script, argv", SCRIPTS, ids=[label for label, _, _ in SCRIPTS])
def test_documented_benchmark_command_parses(label, script, argv, monkeypatch):
    path = ROOT / script
    assert path.is_file(), f"{label}: {script} does not exist"
    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(parser, args=None, namespace=None):
        raise _Parsed(parse_args(parser, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.syspath_prepend(str(path.parent))  # as python puts the script's folder first
    monkeypatch.setattr("sys.argv", [str(path), *argv])
    with pytest.raises(_Parsed):
        runpy.run_path(str(path), run_name="__main__")


def _citations(text: str) -> list[str]:
    tests = [m.group(0) for m in re.finditer(r"tests/test_\w+\.py(?:::\w+)?", text)]
    paths = re.findall(r"(?<![\w/.])((?:src/spikingformer|benchmarks|\.ci)/[\w./-]*\w)", text)
    package = re.findall(r"(?<![\w/.])((?:csrc|kernels|layers|engine|data|analysis|models|deploy)/\w+\.(?:py|cpp|h))\b", text)
    names = re.findall(r"`(spikingformer(?:\.\w+)+)", text)
    return tests + paths + [f"src/spikingformer/{p}" for p in package] + names


CITATIONS = sorted({(doc.relative_to(ROOT).as_posix(), c) for doc in DOCS for c in _citations(doc.read_text(encoding="utf-8"))})


def _resolves(citation: str) -> bool:
    if citation.startswith("tests/"):
        path, _, test = citation.partition("::")
        source = ROOT / path
        return source.is_file() and (not test or re.search(rf"^def {test}\b", source.read_text(), re.M) is not None)
    if "/" in citation:
        return (ROOT / citation).exists()
    parts = citation.split(".")
    for i in range(len(parts), 0, -1):  # the longest importable module, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_the_docs_cite_tests_files_and_names():
    kinds = {c.split("/")[0] if "/" in c else "name" for _, c in CITATIONS}
    assert len(CITATIONS) >= 200 and kinds >= {"tests", "benchmarks", "src", ".ci", "name"}, (len(CITATIONS), kinds)
    assert _resolves("tests/test_docs.py::test_the_docs_cite_tests_files_and_names")
    assert not _resolves("tests/test_docs.py::test_no_such_test") and not _resolves("spikingformer.data.no_such_name")


@pytest.mark.parametrize("doc, citation", CITATIONS, ids=[f"{d}: {c}" for d, c in CITATIONS])
def test_cited_test_file_or_name_exists(doc, citation):
    assert _resolves(citation), f"{doc} cites {citation}, which does not exist (renamed or removed?)"


def _recipe_table() -> dict[str, dict[str, str]]:
    """docs/recipes.md's table of the recipes' settings: {setting: {recipe: cell}}."""
    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    rows = [line for line in text.split("## The recipes and the authors' hyperparameters")[1].splitlines() if line.startswith("|")]
    header = [cell.strip(" `") for cell in rows[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header[1:], cells[1:]))
            for cells in ([cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:])}


def _number(cell: str) -> float:
    return float(re.match(r"[-+0-9.e]+", cell).group(0))


# each row of the table that states a value, as the recipe's configuration gives it
RECIPE_ROWS = {
    "model": lambda c: c.model.model,
    "T (`time_steps`)": lambda c: str(c.data.time_steps),
    "batch size (per process)": lambda c: c.data.batch_size,
    "epochs + cooldown": lambda c: f"{c.schedule.epochs}" + (f" + {c.schedule.cooldown_epochs}" if c.schedule.cooldown_epochs else ""),
    "warm-up epochs": lambda c: str(c.schedule.warmup_epochs),
    "lr / warm-up lr / min lr": lambda c: (c.optim.lr, c.schedule.warmup_lr, c.schedule.min_lr),
    "weight decay": lambda c: c.optim.weight_decay,
    "RandAugment": lambda c: c.data.aa or "-",
    "random erasing": lambda c: c.data.reprob,
    "mixup / cutmix (prob)": lambda c: (c.mixup.mixup, c.mixup.cutmix, c.mixup.mixup_prob),
    "mixup off after epoch": lambda c: str(c.mixup.mixup_off_epoch or ("never" if c.mixup.mixup or c.mixup.cutmix else "-")),
    "label smoothing": lambda c: c.mixup.smoothing,
    "mixed precision": lambda c: c.run.amp,
    "seed": lambda c: str(c.run.seed),
}


def test_the_recipe_table_states_the_recipes():
    table = _recipe_table()
    assert set(RECIPE_ROWS) <= set(table), set(RECIPE_ROWS) - set(table)
    recipes = list(table["model"])
    assert sorted(recipes) == sorted(recipe_names())
    for recipe in recipes:
        cfg = load_config(recipe, {})
        for row, value in RECIPE_ROWS.items():
            cell, expected = table[row][recipe], value(cfg)
            if isinstance(expected, tuple):  # "a / b / c", or "a / b (c)"
                stated = tuple(float(x) for x in re.findall(r"[0-9.]+(?:e-?[0-9]+)?", cell)) if cell != "-" else (0.0,) * 2
                assert stated[:len(expected)] == pytest.approx(expected[:len(stated)]), (recipe, row, cell, expected)
            elif isinstance(expected, float):
                assert (0.0 if cell == "-" else _number(cell)) == pytest.approx(expected), (recipe, row, cell, expected)
            elif isinstance(expected, int):
                assert int(_number(cell)) == expected, (recipe, row, cell, expected)
            else:
                assert cell.split(" (")[0] == expected, (recipe, row, cell, expected)


def _package_callables() -> dict[str, list]:
    """The public functions and classes of every module of the package, by name."""
    import pkgutil

    import spikingformer

    found: dict[str, list] = {}
    for module in pkgutil.walk_packages(spikingformer.__path__, "spikingformer."):
        if module.name.endswith("__main__"):
            continue
        for name, obj in vars(importlib.import_module(module.name)).items():
            if (not name.startswith("_") and callable(obj) and getattr(obj, "__module__", "").startswith("spikingformer")
                    and all(obj is not seen for seen in found.get(name, []))):
                found.setdefault(name, []).append(obj)
    return found


def _documented_calls() -> list[tuple[str, str]]:
    """(doc, span) for every inline ``name(arguments)`` that parses as a Python call."""
    calls = []
    for doc in DOCS:
        for span in re.findall(r"(?<!`)`([A-Za-z_][\w.]*\([^`]*\))`(?!`)", _prose(doc)):
            try:
                if isinstance(ast.parse(span, mode="eval").body, ast.Call):
                    calls.append((doc.relative_to(ROOT).as_posix(), " ".join(span.split())))
            except SyntaxError:
                continue
    return calls


def _fits(obj, call: ast.Call) -> str | None:
    """Why the documented call does not fit ``obj``'s signature (None: it fits). Where the call names
    every parameter that has a default, as a signature written out does, the defaults must match."""
    sig = inspect.signature(obj)
    positional = [None for arg in call.args if not (isinstance(arg, ast.Constant) and arg.value is Ellipsis)]
    keywords = {k.arg: k.value for k in call.keywords if k.arg is not None}
    try:
        sig.bind_partial(*positional, **{k: None for k in keywords})
    except TypeError as err:
        return str(err)
    defaulted = {n for n, p in sig.parameters.items() if p.default is not p.empty}
    if keywords and set(keywords) == defaulted:
        for name, value in keywords.items():
            try:
                stated = ast.literal_eval(value)
            except ValueError:
                continue
            if stated is not Ellipsis and stated != sig.parameters[name].default:
                return f"{name}={stated!r}, but the default is {sig.parameters[name].default!r}"
    return None


def test_documented_calls_fit_the_package_signatures():
    callables, checked, wrong = _package_callables(), 0, []
    for doc, span in _documented_calls():
        call = ast.parse(span, mode="eval").body
        candidates = callables.get(ast.unparse(call.func).split(".")[-1], [])
        if candidates:  # a peer's name (SpikingJelly's LIFNode, tonic's ToFrame) is not ours to check
            checked += 1
            reasons = [_fits(obj, call) for obj in candidates]
            if all(reasons):
                wrong.append(f"{doc}: `{span}`: {reasons}")
    assert checked >= 25, checked
    assert not wrong, "\n".join(wrong)


def _package_doc_references() -> list[tuple[str, str, str]]:
    """(source file, doc, section or "") for each ``docs/X.md`` the package's messages and docstrings
    name, with the section they name (``docs/reliability.md, "Compilers"`` or ``docs/performance.md#gpu``)."""
    found = set()
    for source in sorted((ROOT / "src" / "spikingformer").rglob("*")):
        if source.suffix in (".py", ".cpp", ".yaml"):
            for doc, section, anchor in re.findall(r'(docs/[\w-]+\.md)(?:, \\?"([^"\\]+)\\?"|#([\w-]+))?', source.read_text()):
                section = re.sub(r"\s*\n\s*(?:#|//)?\s*", " ", section)  # a name across comment lines
                found.add((source.relative_to(ROOT).as_posix(), doc, section or anchor))
    return sorted(found)


def test_the_package_sends_users_to_docs_sections_that_exist():
    references = _package_doc_references()
    assert len(references) >= 20 and any(section for _, _, section in references), len(references)
    missing = []
    for source, doc, section in references:
        path = ROOT / doc
        if not path.is_file():
            missing.append(f"{source}: {doc} does not exist")
            continue
        if section and not (any(h.startswith(section) for h in _headings(path)) or section in set(_anchors(path))):
            missing.append(f"{source}: {doc} has no section {section!r}")
    assert not missing, "\n".join(missing)


def _anchors(markdown: Path) -> Iterator[str]:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces as
    hyphens, ``-1``, ``-2``... for repeats)."""
    seen: dict[str, int] = {}
    for heading in _headings(markdown):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def test_markdown_links_and_anchors_resolve():
    """Every relative link of README.md and docs/*.md (the dated log too) names a file that exists
    and, for a Markdown file, a heading it has."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    anchors = {page.resolve(): set(_anchors(page)) for page in pages}
    broken, links = [], 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page)):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            links += 1
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page.resolve()
            if not resolved.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and resolved in anchors and anchor not in anchors[resolved]:
                broken.append(f"{page.name}: {target} (no such heading)")
    assert links >= 100, links
    assert not broken, "\n".join(broken)
