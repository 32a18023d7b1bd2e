"""The README: short, the two commands, links that lead somewhere, and results that are the committed demo's."""

import json
import pathlib
import re

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (REPOSITORY_ROOT / "README.md").read_text()
RESULTS = json.loads((REPOSITORY_ROOT / "demo-output" / "results.json").read_text())
TABLE = re.compile(r"<!-- results-table -->\n(?P<table>.*?)<!-- end results-table -->\n", re.DOTALL)


def test_the_readme_is_a_short_front_door():
    assert len(README.encode()) <= 10_240


def test_the_readme_gives_the_two_commands():
    assert "make demo " in README and "make test " in README


def test_every_relative_link_and_image_of_the_readme_exists():
    targets = re.findall(r"\]\((?!https?://|#)([^)#]+)(?:#[^)]*)?\)", README)
    assert "docs/choosing-an-average.md" in targets and "demo-output/validation_loss.png" in targets
    missing = [target for target in targets if not (REPOSITORY_ROOT / target).exists()]
    assert missing == []


def results_table() -> str:
    """The README's table as the committed demo results give it (MASE mean ± std, seeds no worse)."""
    summary, seeds = RESULTS["summary"], len(RESULTS["settings"]["seeds"])
    lines = ["| method | co2 MASE | no worse | macrodata MASE | no worse |", "|---|---:|---:|---:|---:|"]
    for method in summary["co2"]:
        cells = []
        for dataset in ("co2", "macrodata"):
            scores = summary[dataset][method]
            no_worse = "" if method == "last iterate" else f"{scores['seeds_no_worse_MASE']} of {seeds}"
            cells += [f"{scores['MASE']['mean']:.3f} ± {scores['MASE']['std']:.3f}", no_worse]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def test_the_results_table_is_the_committed_demo_results():
    assert not RESULTS["settings"]["quick"]
    assert TABLE.search(README).group("table") == results_table()
