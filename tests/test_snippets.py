"""Every code block of README.md and docs/*.md runs, or is exempted with a reason, so the documentation cannot rot.

Each fenced code block must have a marker line right above it, ``<!-- snippet: KIND -->``,
saying how it is checked; MyST directive blocks (a fence opening with three backticks and
``{``, such as ``{toctree}``) are not code and need none:

- ``gluonts``, ``gluon``, ``gluon-run``, ``module``, ``callback-config``: Python, executed with
  the names the block does not define given tiny real data (``tests/snippet_setups.py``), then
  checked for what the block says it does. Blocks of the same code (comments aside) run once.
- ``shell``: each line is run (after its ``# comment``) in a folder holding a real ``run/``; exit 0.
- ``transcript``: ``$ command`` lines, each followed by its exact output.
- ``messages``: each line is one the ``modavg`` command prints for some bad input.
- ``output: PATH``: the script's standard output contains the block's lines.
- ``layout``: the files and folders named exist, and every module of the package is named.
- ``skip: REASON``: not run; the reason is required.

A block without a marker, or with an unknown kind, fails the first test, naming file and line.
Python blocks are compiled with their Markdown file's name and line numbers, so a traceback
points at the documentation line.
"""

import ast
import difflib
import glob
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import mxnet as mx
import numpy as np
import pytest
from gluonts.env import env
from gluonts.model.predictor import Predictor
from gluonts.mx import SimpleFeedForwardEstimator
from numpy.testing import assert_allclose

from modavg_plugin.cli import main
from modavg_plugin.gluon import network_parameters
from modavg_plugin.registry import ConfigurationError

import snippet_setups
from conftest import read_weights

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = ["README.md", *sorted(str(path.relative_to(REPOSITORY_ROOT)) for path in REPOSITORY_ROOT.glob("docs/*.md"))]
FENCE = "```"
MARKER = re.compile(r"^<!-- snippet: (?P<kind>.*?) -->\s*$")
PYTHON_KINDS = ("gluonts", "gluon", "gluon-run", "module", "callback-config")
TEXT_KINDS = ("shell", "transcript", "messages", "layout")
PREFIXED_KINDS = ("output:", "skip:")  # followed by a path, a reason
TIMEOUT = 120  # seconds, for each command and script run

Namespace = Dict[str, Any]


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown document and the marker above it."""

    document: str  # relative to the repository, e.g. "docs/gluon-loops.md"
    marker_line: int  # 1-based, the line of ``<!-- snippet: KIND -->``, right above the opening fence
    kind: str
    text: str  # the lines between the fences

    @property
    def id(self) -> str:
        """``document:line`` of the marker (what ``grep -n "snippet:"`` shows)."""
        return f"{self.document}:{self.marker_line}"

    @property
    def first_line(self) -> int:
        """The 1-based line number in the document of the block's first line."""
        return self.marker_line + 2


def kind_problem(kind: str) -> Optional[str]:
    """Why ``kind`` is not a usable marker kind, or ``None``."""
    if kind in PYTHON_KINDS or kind in TEXT_KINDS:
        return None
    for prefix in PREFIXED_KINDS:
        if kind.startswith(prefix):
            return None if kind[len(prefix) :].strip() else f"'{prefix}' needs a text after it"
    known = ", ".join([*PYTHON_KINDS, *TEXT_KINDS, "output: PATH", "skip: REASON"])
    return f"unknown snippet kind {kind!r} (known: {known})"


def parse_markdown(text: str, document: str) -> Tuple[List[Block], List[str]]:
    """The marked code blocks of a Markdown text, and a ``document:line: problem`` for each bad one.

    Fences are lines starting with three backticks; inside a fence nothing else
    opens. A code block needs a ``<!-- snippet: KIND -->`` line right above its
    opening fence; directive blocks (an opening fence followed by ``{``) need none.
    """
    blocks: List[Block] = []
    problems: List[str] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line, number = lines[index], index + 1
        if MARKER.match(line) and not (index + 1 < len(lines) and lines[index + 1].startswith(FENCE)):
            problems.append(f"{document}:{number}: a snippet marker without a code block right below it")
        if not line.startswith(FENCE):
            index += 1
            continue
        closing = next((end for end in range(index + 1, len(lines)) if lines[end].startswith(FENCE)), None)
        if closing is None:
            problems.append(f"{document}:{number}: a code fence that is never closed")
            break
        marker = MARKER.match(lines[index - 1]) if index > 0 else None
        kind = marker.group("kind").strip() if marker else ""
        if line[len(FENCE) :].lstrip().startswith("{"):
            if marker:
                problems.append(f"{document}:{index}: a snippet marker above a directive block, which is not code")
        elif not marker:
            problems.append(f"{document}:{number}: a code block without a '<!-- snippet: KIND -->' line right above it")
        elif kind_problem(kind):
            problems.append(f"{document}:{index}: {kind_problem(kind)}")
        else:
            blocks.append(Block(document, index, kind, "".join(f"{body}\n" for body in lines[index + 1 : closing])))
        index = closing + 1
    return blocks, problems


def collect() -> Tuple[List[Block], List[str]]:
    """The marked blocks of every document, and every problem found."""
    blocks: List[Block] = []
    problems: List[str] = []
    for document in DOCUMENTS:
        found, wrong = parse_markdown((REPOSITORY_ROOT / document).read_text(encoding="utf-8"), document)
        blocks += found
        problems += wrong
    return blocks, problems


BLOCKS, PROBLEMS = collect()


# The marker parser ------------------------------------------------------------------------------


def test_every_code_block_has_a_marker_of_a_known_kind():
    assert len(BLOCKS) >= 10, "the documents were not found, or lost their code blocks"
    assert PROBLEMS == [], "\n".join(PROBLEMS)


def test_the_parser_refuses_an_unmarked_block_and_ignores_directives():
    text = "# Title\n\n```{toctree}\nindex\n```\n\nSome code:\n\n```python\nprint(1)\n```\n"
    blocks, problems = parse_markdown(text, "doc.md")
    assert blocks == []
    assert problems == ["doc.md:9: a code block without a '<!-- snippet: KIND -->' line right above it"]


def test_the_parser_refuses_unknown_kinds_empty_reasons_stray_markers_and_open_fences():
    text = (
        "<!-- snippet: gluonts -->\n```python\nx = 1\n```\n"  # fine
        "<!-- snippet: pyhton -->\n```python\nx = 2\n```\n"  # a misspelt kind
        "<!-- snippet: skip: -->\n```\nx = 3\n```\n"  # no reason
        "<!-- snippet: shell -->\n\n```\nls\n```\n"  # not right above its block
        "<!-- snippet: shell -->\n```\nnever closed\n"
    )
    blocks, problems = parse_markdown(text, "doc.md")
    assert blocks == [Block("doc.md", 1, "gluonts", "x = 1\n")]
    assert len(problems) == 5, problems
    assert problems[0].startswith("doc.md:5: unknown snippet kind 'pyhton'")
    assert problems[1] == "doc.md:9: 'skip:' needs a text after it"
    assert problems[2] == "doc.md:13: a snippet marker without a code block right below it"
    assert problems[3] == "doc.md:15: a code block without a '<!-- snippet: KIND -->' line right above it"
    assert problems[4] == "doc.md:19: a code fence that is never closed"


def test_the_parser_refuses_a_marker_on_a_directive_block():
    blocks, problems = parse_markdown("<!-- snippet: shell -->\n```{toctree}\nindex\n```\n", "doc.md")
    assert (blocks, problems) == ([], ["doc.md:1: a snippet marker above a directive block, which is not code"])


# Python blocks ----------------------------------------------------------------------------------

OUTCOMES: Dict[str, Tuple[str, Optional[str]]] = {}  # code (as its syntax tree) -> (first block id, its failure)


def python_source(block: Block) -> str:
    """The block's code, after as many empty lines as precede it in its document (so line numbers match)."""
    text = snippet_setups.substitute_training_step(block.text) if block.kind == "gluon-run" else block.text
    return "\n" * (block.first_line - 1) + text


def run_python(block: Block, setup: Callable[[], Namespace], check: Callable[[Namespace], None]) -> None:
    """Execute the block in the names ``setup`` gives, then ``check`` them.

    Code already run (the same syntax tree: comments and layout aside) is not run again.
    """
    code = compile(python_source(block), block.document, "exec", flags=ast.PyCF_ONLY_AST)
    key = f"{block.kind}\n{ast.dump(code)}"
    if key in OUTCOMES:
        first, failure = OUTCOMES[key]
        if failure is not None:
            pytest.fail(f"{block.id} is the same code as {first}, which failed:\n{failure}")
        return
    try:
        namespace = setup()
        with env._let(use_tqdm=False):
            exec(compile(code, block.document, "exec"), namespace)
        check(namespace)
    except Exception:
        OUTCOMES[key] = (block.id, traceback.format_exc())
        raise
    OUTCOMES[key] = (block.id, None)


def check_gluonts(namespace: Namespace) -> None:
    """The estimator has the callback; when trained, one EMA update per step and validation every epoch."""
    ema, estimator = namespace["ema"], namespace["estimator"]
    assert isinstance(estimator, SimpleFeedForwardEstimator)
    assert ema in estimator.trainer.callbacks.callbacks
    if "predictor" not in namespace:  # the short copy stops before training
        assert ema.num_updates == 0
        return
    assert isinstance(namespace["predictor"], Predictor)
    trainer = estimator.trainer
    assert ema.num_updates == trainer.epochs * trainer.num_batches_per_epoch
    assert [entry["epoch_no"] for entry in ema.history] == list(range(trainer.epochs))
    assert all(np.isfinite(entry["validation_loss"]) for entry in ema.history)


def check_gluon(namespace: Namespace) -> None:
    """``evaluate`` saw the EMA; afterwards the network holds the raw weights again, which differ from it."""
    ema, net, trainer, evaluate = namespace["ema"], namespace["net"], namespace["trainer"], namespace["evaluate"]
    assert trainer.steps == len(namespace["train_batches"])
    shadows = {name: value.asnumpy().astype(np.float64) for name, value in ema.shadows.items()}
    assert len(evaluate.seen) == 1
    assert_weights_equal(evaluate.seen[0], shadows)
    raw = read_weights(net)
    assert_weights_equal(raw, trainer.after_last_step)
    assert not all(np.allclose(raw[name], shadows[name], rtol=1e-3) for name in raw), "the EMA equals the raw weights"


def check_gluon_run(namespace: Namespace) -> None:
    """``out/`` keeps the best epochs' EMAs, and the network holds their mean, not the raw weights."""
    run, net, trainer = namespace["run"], namespace["net"], namespace["trainer"]
    epochs, batches = namespace["epochs"], len(namespace["train_batches"])
    assert run.num_updates == epochs * batches == trainer.steps
    assert len(run.history) == epochs
    kept = sorted(glob.glob("out/epoch-*.params"))
    assert len(kept) == run.strategy.num_models < epochs, kept
    validation_losses = dict(enumerate(namespace["evaluate"].losses[:epochs]))  # one call per epoch, then finish's
    assert_kept_are_best(kept, validation_losses, maximize=False)
    final = {name: parameter.data().asnumpy() for name, parameter in network_parameters(net)}
    assert_weights_equal(final, mean_of_files(kept))
    final_by_full_name, raw = read_weights(net), trainer.after_last_step
    assert not all(np.allclose(final_by_full_name[name], raw[name], rtol=1e-3) for name in raw), (
        "the network holds the raw weights"
    )


def check_module(namespace: Namespace) -> None:
    """One update per batch, Module checkpoints of the kept epochs, and the module holding their mean."""
    averaging, module = namespace["averaging"], namespace["module"]
    epochs = len(averaging.history)
    assert epochs >= 3
    assert averaging.num_updates == epochs * snippet_setups.batches_per_epoch(namespace["train_iter"])
    assert os.path.isfile("out/model-symbol.json")
    kept = sorted(glob.glob("out/model-[0-9][0-9][0-9][0-9].params"))
    assert len(kept) == averaging.avg_strategy.num_models, kept
    accuracies = {entry["epoch_no"]: entry["accuracy"] for entry in averaging.history}
    assert_kept_are_best(kept, accuracies, maximize=True)
    arg_params, aux_params = module.get_params()
    final = {f"arg:{name}": value.asnumpy() for name, value in arg_params.items()}
    final.update({f"aux:{name}": value.asnumpy() for name, value in aux_params.items()})
    assert_weights_equal(final, mean_of_files(kept))
    _, loaded, _ = mx.model.load_checkpoint("out/model", epoch_of(kept[0]))  # a normal Module checkpoint
    assert set(loaded) == set(arg_params)


def check_callback_config(namespace: Namespace) -> None:
    """The callback trains a network with BatchNorm (its exclude pattern matches) and leaves post-hoc snapshots."""
    callback = namespace["callback"]
    snippet_setups.train_tiny_gluonts(callback, batch_norm=True)
    shadows = callback.moving_average.shadows
    assert shadows and not any("batchnorm" in name for name in shadows), sorted(shadows)
    snapshots = glob.glob("run/posthoc/*.params")
    assert len(snapshots) >= 4, snapshots
    assert main(["posthoc", "run/posthoc", "--sigma-rel", "0.08", "-o", "ema-0.08.params"]) == 0
    assert os.path.isfile("ema-0.08.params")


def assert_weights_equal(actual: Dict[str, np.ndarray], expected: Dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for name in actual:
        assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def epoch_of(path: str) -> int:
    """The epoch number NNNN of a checkpoint ``...-NNNN.params``."""
    return int(re.fullmatch(r".*-(\d{4})\.params", path).group(1))


def assert_kept_are_best(kept: List[str], scores: Dict[int, float], maximize: bool) -> None:
    """The checkpoints ``kept`` (``...-NNNN.params``, NNNN the epoch number) score at least as well as every other epoch."""
    kept_epochs = {epoch_of(path) for path in kept}
    sign = 1 if maximize else -1
    worst_kept = min(sign * scores[epoch] for epoch in kept_epochs)
    best_other = max(sign * score for epoch, score in scores.items() if epoch not in kept_epochs)
    assert worst_kept >= best_other, (sorted(kept_epochs), scores)


def mean_of_files(paths: List[str]) -> Dict[str, np.ndarray]:
    """The equal-weight mean of ``.params`` files, in float64."""
    loaded = [mx.nd.load(path) for path in paths]
    return {
        name: np.mean([arrays[name].asnumpy().astype(np.float64) for arrays in loaded], axis=0) for name in loaded[0]
    }


PYTHON_SETUPS: Dict[str, Tuple[Callable[[], Namespace], Callable[[Namespace], None]]] = {
    "gluonts": (snippet_setups.gluonts_namespace, check_gluonts),
    "gluon": (snippet_setups.gluon_namespace, check_gluon),
    "gluon-run": (snippet_setups.gluon_run_namespace, check_gluon_run),
    "module": (snippet_setups.module_namespace, check_module),
    "callback-config": (snippet_setups.callback_config_namespace, check_callback_config),
}


# Text blocks --------------------------------------------------------------------------------------


def numbered_lines(block: Block) -> List[Tuple[int, str]]:
    """The block's non-blank lines with their line numbers in the document, trailing spaces stripped."""
    lines = [(block.first_line + offset, line.rstrip()) for offset, line in enumerate(block.text.splitlines())]
    return [(number, line) for number, line in lines if line]


def run_command(words: List[str]) -> subprocess.CompletedProcess:
    """A documented command, as a user would run it here (the installed ``modavg``, this Python)."""
    return subprocess.run(snippet_setups.command_argv(words), capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> pathlib.Path:
    """A folder holding ``run/`` (:func:`snippet_setups.build_run_folder`), built once and copied for each block."""
    folder = tmp_path_factory.mktemp("run-template")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        snippet_setups.build_run_folder()
    return folder / "run"


def check_shell(block: Block, run_folder: pathlib.Path) -> None:
    """Each line, its ``# comment`` left out, exits 0 in a folder holding ``run/``, and writes what it printed."""
    shutil.copytree(run_folder, "run")
    for number, line in numbered_lines(block):
        words = shlex.split(line, comments=True)
        result = run_command(words)
        where = f"{block.document}:{number}: {line.strip()}"
        assert result.returncode == 0, f"{where}\nexited {result.returncode}:\n{result.stderr}"
        if "--dry-run" in words:
            assert "nothing written" in result.stdout, f"{where}\n{result.stdout}"
        else:
            written = result.stdout.strip().splitlines()[-1]
            assert os.path.isfile(written), f"{where}\nprinted {written!r}, which is not a file"


def parse_transcript(block: Block) -> List[Tuple[int, str, List[str]]]:
    """``$ command`` lines and the output lines after each: (line number, command, output lines)."""
    commands: List[Tuple[int, str, List[str]]] = []
    for offset, line in enumerate(block.text.splitlines()):
        if line.startswith("$ "):
            commands.append((block.first_line + offset, line[2:], []))
        else:
            assert commands, f"{block.document}:{block.first_line + offset}: output before the first '$ ' command"
            commands[-1][2].append(line.rstrip())
    return commands


def check_transcript(block: Block) -> None:
    """Each command, run in a folder holding the ``ck/`` it names, prints exactly the lines shown after it."""
    snippet_setups.build_transcript_folder()
    commands = parse_transcript(block)
    assert commands, f"{block.id}: no '$ ' command"
    for number, command, expected in commands:
        result = run_command(shlex.split(command))
        shown = [line.rstrip() for line in (result.stdout + result.stderr).splitlines()]
        while expected and not expected[-1]:
            expected.pop()
        diff = "\n".join(difflib.unified_diff(expected, shown, "documented", "printed", lineterm=""))
        assert result.returncode == 0 and shown == expected, f"{block.document}:{number}: $ {command}\n{diff}"


def check_messages(block: Block) -> None:
    """Each line is one ``modavg`` prints on stderr for a bad input (errors with a failing exit status)."""
    printed = snippet_setups.printed_messages()
    for code, line in printed:
        assert code != 0 or not line.startswith("modavg: error:"), (code, line)
    real = [line for _, line in printed]
    wrong = []
    for number, line in numbered_lines(block):
        if line not in real:
            closest = difflib.get_close_matches(line, real, n=1, cutoff=0.0)
            wrong.append(f"{block.document}:{number}:\n  documented: {line}\n  printed:    {''.join(closest)}")
    assert wrong == [], "\n".join(wrong)


def check_output(block: Block, script: str) -> None:
    """The script, run from a temporary folder, exits 0 and prints the block's lines, in order and together."""
    path = REPOSITORY_ROOT / script
    assert path.is_file(), f"{block.id}: {script} does not exist"
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [line.rstrip() for line in result.stdout.splitlines()]
    expected = [line for _, line in numbered_lines(block)]
    found = any(printed[start : start + len(expected)] == expected for start in range(len(printed)))
    diff = "\n".join(difflib.unified_diff(expected, printed, "documented", "printed", lineterm=""))
    assert found, f"{block.id}: {script} does not print the block's lines:\n{diff}"


def check_layout(block: Block) -> None:
    """Every top-level entry and every ``.py`` file named under it exists; every package module is named."""
    sections: Dict[str, List[str]] = {}
    for _, line in numbered_lines(block):
        if not line[0].isspace():
            entry = line.split()[0]
            sections[entry] = [line[len(entry) :]]
        else:
            assert sections, f"{block.id}: an indented line before the first entry: {line!r}"
            sections[list(sections)[-1]].append(line)
    missing = [entry for entry in sections if not (REPOSITORY_ROOT / entry).exists()]
    for entry, lines in sections.items():
        if entry.endswith("/"):
            named = re.findall(r"[\w./-]*\w\.py\b", " ".join(lines))
            missing += [f"{entry}{name}" for name in named if not (REPOSITORY_ROOT / entry / name).is_file()]
    assert missing == [], f"{block.id}: named but missing: {missing}"
    package = "modavg_plugin/"
    assert package in sections, f"{block.id}: no {package} entry"
    named = set(re.findall(r"[\w]+\.py\b", " ".join(sections[package])))
    modules = {path.name for path in (REPOSITORY_ROOT / package).glob("*.py")} - {"__init__.py"}
    assert sorted(modules - named) == [], f"{block.id}: modules of the package the layout does not name"


# Every block ------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_snippet(block: Block, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    kind, _, argument = block.kind.partition(":")
    if kind == "skip":
        pytest.skip(argument.strip())
    elif block.kind in PYTHON_SETUPS:
        setup, check = PYTHON_SETUPS[block.kind]
        run_python(block, setup, check)
    elif kind == "output":
        check_output(block, argument.strip())
    elif kind == "shell":
        check_shell(block, request.getfixturevalue("run_folder"))
    elif kind == "transcript":
        check_transcript(block)
    elif kind == "messages":
        check_messages(block)
    elif kind == "layout":
        check_layout(block)
    else:
        pytest.fail(f"{block.id}: no test for snippet kind {block.kind!r}")


# The tests can fail: a changed number in a copy of a block --------------------------------------


def first_block(kind: str) -> Block:
    block = next((block for block in BLOCKS if block.kind == kind), None)
    if block is None:
        pytest.fail(f"no '{kind}' block in the documents")
    return block


def test_a_changed_number_in_a_message_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    block = first_block("messages")
    mutated = Block(block.document, block.marker_line, block.kind, block.text.replace("got 0 (", "got 1 ("))
    assert mutated.text != block.text
    with pytest.raises(AssertionError, match=r"got 1 \(.*\n\s*printed: .*got 0 \("):
        check_messages(mutated)


def test_an_ema_with_decay_0_fails_the_gluon_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    block = first_block("gluon")
    mutated = Block(block.document, block.marker_line, block.kind, block.text.replace("decay=0.99", "decay=0.0"))
    assert mutated.text != block.text
    with pytest.raises(AssertionError, match="the EMA equals the raw weights"):
        run_python(mutated, snippet_setups.gluon_namespace, check_gluon)


def test_the_callback_config_exclude_pattern_must_match_a_parameter(tmp_path, monkeypatch):
    """Without BatchNorm, ``"exclude": ["*batchnorm*"]`` matches nothing: an error, so the block's check means something."""
    monkeypatch.chdir(tmp_path)
    namespace = snippet_setups.callback_config_namespace()
    exec(compile(python_source(first_block("callback-config")), "callback-config", "exec"), namespace)
    with pytest.raises(ConfigurationError, match="batchnorm"):
        snippet_setups.train_tiny_gluonts(namespace["callback"], batch_norm=False, epochs=1)


def test_the_layout_check_fails_on_a_missing_file_and_on_an_unnamed_module():
    block = first_block("layout")
    ghost = Block(block.document, block.marker_line, block.kind, block.text.replace("  checks.py ", "  ghost.py  "))
    assert ghost.text != block.text
    with pytest.raises(AssertionError, match=r"named but missing: \['modavg_plugin/ghost.py'\]"):
        check_layout(ghost)
    unnamed = [line for line in block.text.splitlines() if not line.startswith("  checks.py ")]
    with pytest.raises(AssertionError, match=r"\['checks.py'\]"):
        check_layout(Block(block.document, block.marker_line, block.kind, "\n".join(unnamed) + "\n"))
