"""Every figure the README and docs/ quote from a benchmark is generated from the committed results
(`python -m benchmarks.report`): the blocks are as that command writes them, a hand-edited number
is caught, and the README's prose quotes no measured figure outside a generated block or a
one-off measurement marked with its date and machine."""

import importlib.util
import re

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("figures", REPO / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

# A measured quantity: a number with a unit of time, size, rate or ratio, or a loss or perplexity
# (not a margin added to a config value, as in `timeout_s` + 15 s: a bound the code keeps).
MEASURED = re.compile(
    r"(?<!\+ )\b\d[\d,]*(\.\d+)?\s*(%|x\b|GB|GiB|MB|MiB|KB|bytes|tok/s|TFLOP/s|ms\b|s\b|min\b|minutes|seconds|hours)"
    r"|\b(ppl|loss)\s+\d"
)
ONE_OFF = re.compile(
    r"<!-- one-off: (?P<when>\d{4}-\d{2}-\d{2}), (?P<where>[^>]+) -->(?P<body>.*?)<!-- /one-off -->", re.DOTALL
)
FENCE = re.compile(r"```.*?```", re.DOTALL)


@pytest.mark.parametrize("document", report.DOCUMENTS)
def test_every_generated_block_is_as_the_results_give_it(document):
    stale = report.stale((REPO / document).read_text())
    assert not stale, f"{document}: {stale} stale: run python -m benchmarks.report"


def test_a_hand_edited_number_is_caught():
    text = (REPO / "README.md").read_text()
    block = next(report.BLOCK.finditer(text), None)
    assert block is not None and block["name"] == "headline"
    number = re.search(r"\d+%", block["body"])
    edited = text[: block.start("body") + number.start()] + "99%" + text[block.start("body") + number.end() :]
    assert report.stale(text) == [] and report.stale(edited) == ["headline"]
    assert report.render(edited) == text  # and the command puts it back


def test_every_figure_is_used_and_every_block_named():
    used = {m["name"] for name in report.DOCUMENTS for m in report.BLOCK.finditer((REPO / name).read_text())}
    assert used == set(report.FIGURES)


def test_the_readme_prose_quotes_no_measured_figure_without_its_source():
    text = (REPO / "README.md").read_text()
    for one_off in ONE_OFF.finditer(text):  # a one-off says so where it is read
        assert f"measured once, {one_off['when']}, {one_off['where']}" in one_off["body"]
    prose = FENCE.sub("", ONE_OFF.sub("", report.BLOCK.sub("", text)))
    quoted = [m.group(0) for m in MEASURED.finditer(prose)]
    assert quoted == [], f"measured figures with no generated source in the README's prose: {quoted}"
