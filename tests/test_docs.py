"""The docs stay true: the configuration reference is what config.py says, every `cocodc` command
the README and docs/ show parses (its config loads with its overrides, its paths exist), and every
relative link leads somewhere. Nothing here runs a command."""

import importlib.util
import re
import shlex

import pytest

from cocodc import config_doc
from cocodc.cli import netem_parser
from cocodc.config import ConfigError, load_config
from cocodc.model_io import export_parser, generate_parser
from cocodc.run_dir import build_parser

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_config_reference_is_generated_from_config_py():
    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == config_doc.render(), "docs/config.md is stale: python -m cocodc.config_doc > docs/config.md"


def test_every_config_key_has_a_meaning_in_config_py():
    class Undocumented:
        documented: int = 1  # what it means
        silent: int = 2

    assert config_doc.field_comments(Undocumented) == {"documented": "what it means"}
    assert "`train.grad_accum`" in config_doc.render()


def code_lines() -> list[tuple[str, str]]:
    """(page:line, the line with its continuations joined) of every line in a code block."""
    found = []
    for page in PAGES:
        in_code, pending, start = False, "", 0
        for number, line in enumerate(page.read_text().splitlines(), start=1):
            if line.startswith("```"):
                in_code, pending = not in_code, ""
                continue
            if not in_code:
                continue
            if not pending:
                start = number
            text = pending + line.strip()
            if text.endswith("\\"):
                pending = text[:-1] + " "
                continue
            pending = ""
            found.append((f"{page.relative_to(REPO)}:{start}", text))
    return found


def shown_commands() -> list[tuple[str, list[str]]]:
    """(page:line, argv after `cocodc`) of every cocodc command in a code block; `torchrun ... -m
    cocodc.train ...` counts as `cocodc train ...`."""
    found = []
    for where, text in code_lines():
        if not (text.startswith("cocodc ") or "-m cocodc.train" in text):
            continue  # other shells' lines, Python, output
        words = shlex.split(text, comments=True)
        if words[:1] == ["cocodc"]:
            found.append((where, words[1:]))
        elif "cocodc.train" in words:
            found.append((where, ["train", *words[words.index("cocodc.train") + 1 :]]))
    return found


def shown_benchmarks() -> list[tuple[str, str, list[str]]]:
    """(page:line, script, its arguments) of every `python benchmarks/<script>.py ...` (or `python
    -m benchmarks.<script>`) in a code block."""
    found = []
    for where, text in code_lines():
        if not re.search(r"python3? +(-m +benchmarks\.|\S*benchmarks/\w+\.py)", text):
            continue
        words = shlex.split(text, comments=True)
        for index, word in enumerate(words):
            script = re.fullmatch(r"benchmarks[/.](\w+?)(\.py)?", word)
            if script and index and words[index - 1].endswith(("python", "python3", "-m")):
                found.append((where, script[1], words[index + 1 :]))
    return found


COMMANDS = shown_commands()
BENCHMARKS = shown_benchmarks()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 8
    assert {argv[0] for _, argv in COMMANDS} >= {"train", "netem", "report"}


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[where for where, _ in COMMANDS])
def test_a_shown_command_parses(where, argv):
    command, args = argv[0], argv[1:]
    if command == "train":
        options = build_parser().parse_args(args)
        assert (REPO / options.config).is_file(), f"{where}: no config {options.config}"
        try:
            load_config(REPO / options.config, options.overrides)  # a wrong key or value raises
        except ConfigError as err:  # but a model to start from is one that a command before it made
            assert str(err).startswith("model.init_from: no such run directory"), f"{where}: {err}"
    elif command == "netem":
        options = netem_parser().parse_args(args)
        assert options.config is None or (REPO / options.config).is_file(), where
    elif command in ("export", "generate"):
        (export_parser() if command == "export" else generate_parser()).parse_args(args)
    else:
        assert command == "report", f"{where}: cocodc has no command {command!r}"
        assert args, f"{where}: cocodc report needs run directories"


def test_the_docs_show_benchmark_commands():
    assert {script for _, script, _ in BENCHMARKS} >= {"convergence", "federated", "split", "hierfed", "memory"}


@pytest.mark.parametrize(("where", "script", "args"), BENCHMARKS, ids=[where for where, _, _ in BENCHMARKS])
def test_a_shown_benchmark_command_parses(where, script, args, monkeypatch):
    path = REPO / "benchmarks" / f"{script}.py"
    assert path.is_file(), f"{where}: no benchmark {script}"
    monkeypatch.syspath_prepend(str(path.parent))  # the scripts import their sibling sweep.py
    spec = importlib.util.spec_from_file_location(f"benchmark_{script}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: benchmarks/{script}.py does not take {shlex.join(args)}")


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_lead_somewhere(page):
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = target.split("#")[0]
        assert (page.parent / path).exists(), f"{page.relative_to(REPO)} links to {target}, which is not there"
