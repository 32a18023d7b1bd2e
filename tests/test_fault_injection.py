"""Fault injection: SIGKILL a real GluonTS training at random moments, then average what it left.

For each seed, ``tests/fault_training.py`` trains a SimpleFeedForward
forecaster whose averaging callback (EMA for even seeds, raw checkpoints for
odd ones; both keep the mean of the 3 best) writes a 1 MB checkpoint and its
epoch-info record every epoch (tens of milliseconds) and deletes what its
strategy can no longer select. Once the run prints ``started``, it is killed
with SIGKILL after a seeded random delay (in the seed's slice of
``KILL_WINDOW_SECONDS``): before the first checkpoint, inside a write (a
``.tmp-*`` leftover), in a prune, or between files. The runs are children
forked one at a time by one ``fault_training.py --serve`` process, so MXNet
and GluonTS are imported once (3-5 s) rather than once per seed; about 20 s
in all on 2 busy cores.

The folder is then averaged twice, by ``modavg average FOLDER -o OUT``
(``cli.main``, in this process) and by ``SelectNBestMean(num_models=3).apply``,
and each must either

- succeed with a valid model: the parameter names of the checkpoints it
  averaged, the network's shapes, finite values within the element-wise
  range of those checkpoints and equal to their NumPy mean, where "those
  checkpoints" are the selected files minus the unusable ones, never a
  ``.tmp-*`` leftover, and every unusable selected file named in a warning;
- or fail (``CheckpointError``; exit status 1 with one ``modavg: error:``
  line), only when no usable checkpoint is left, naming every unusable file
  (or the folder, when no record was written yet).

Which files are unusable is decided here, independently of the library: a
record whose JSON does not parse, or whose params file is missing or not
readable by ``mx.nd.load``. Kills cannot leave such a record behind when
files are renamed into place, so a second test truncates the newest
checkpoint of each killed folder, as a kill leaves a file written in place,
and asks the same of averaging. Each test prints one line per seed saying
what the kill left and what averaging did.
"""

import contextlib
import json
import logging
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
import pytest

from modavg_plugin import CheckpointError, SelectNBestMean
from modavg_plugin.cli import main
from modavg_plugin.folders import EPOCH_INFO_SUFFIX

TRAINING_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_training.py")
SEEDS = range(12)
CALLBACKS = ("exponential", "checkpoints")  # by seed parity
KILL_WINDOW_SECONDS = 1.5  # an epoch takes tens of milliseconds; the first checkpoint comes ~0.1 s after the start
SERVER_TIMEOUT_SECONDS = 180.0  # a hung server is killed, failing the test, rather than blocking the suite
TEMPORARY_PREFIX = ".tmp-"  # the library's names for files being written
API_NUM_MODELS = 3
CLI_DEFAULT_NUM_MODELS = 5
FLOAT32_ULPS = 4 * np.finfo(np.float32).eps
LIBRARY_LOGGER = "modavg_plugin"

Shapes = Dict[str, Tuple[int, ...]]


@dataclass
class KilledRun:
    """A training run killed with SIGKILL: where it wrote and what it printed."""

    seed: int
    kind: str
    delay: float
    folder: str
    lines: List[str]

    @property
    def network_shapes(self) -> Optional[Shapes]:
        """The live network's parameter shapes by full name; ``None`` if killed before it was built."""
        for line in self.lines:
            if line.startswith("network "):
                return {name: tuple(shape) for name, shape in json.loads(line[len("network ") :]).items()}
        return None

    @property
    def epochs_done(self) -> int:
        """How many epochs had written and pruned their files before the kill."""
        return sum(line.startswith("epoch ") for line in self.lines)


@dataclass
class Record:
    """An epoch-info file (final name) and the params file it points at (``None``: not valid JSON)."""

    info_path: str
    params_path: Optional[str]


@dataclass
class Outcome:
    """What one way of averaging did: the file written, or the error; and everything it reported."""

    output: Optional[str] = None
    selected: List[str] = field(default_factory=list)
    error: Optional[str] = None
    messages: str = ""


# Killing ----------------------------------------------------------------------


class TrainingServer:
    """``tests/fault_training.py --serve``: imports once, then trains one forked child at a time for us to kill.

    Parameters
    ----------
    stderr_path
        Where the server's and the children's stderr go (quoted when something fails).
    """

    def __init__(self, stderr_path: str) -> None:
        self.stderr_path = stderr_path
        with open(stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, TRAINING_SCRIPT, "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=child_environment(),
            )
        self.child: Optional[int] = None
        self.lines: List[str] = []
        self.watchdog = threading.Timer(SERVER_TIMEOUT_SECONDS, self.kill)
        self.watchdog.start()
        self.wait_for("ready")

    def wait_for(self, prefix: str) -> str:
        """The first line of this run starting with ``prefix``, read on if needed; at the end of output, fails."""
        for line in self.lines:
            if line.startswith(prefix):
                return line
        for line in self.process.stdout:
            self.lines.append(line.strip())
            if line.startswith(prefix):
                return self.lines[-1]
        with open(self.stderr_path) as stderr:
            pytest.fail(f"the training server stopped before printing {prefix!r}; its stderr:\n{stderr.read()[-3000:]}")

    def kill_run(self, folder: str, kind: str, delay: float) -> List[str]:
        """Train into ``folder``, SIGKILL the run ``delay`` seconds after it starts; the lines printed meanwhile."""
        self.lines = []
        self.process.stdin.write(json.dumps([folder, kind]) + "\n")
        self.process.stdin.flush()
        self.child = int(self.wait_for("forked ").split()[1])
        self.wait_for("started ")
        time.sleep(delay)
        os.kill(self.child, signal.SIGKILL)
        exited = self.wait_for("exited ")
        self.child = None
        assert int(exited.split()[1]) == -signal.SIGKILL, f"the run ended on its own ({exited}), see {self.stderr_path}"
        return self.lines

    def kill(self) -> None:
        """SIGKILL the current child, if any, and the server (the watchdog's way out of a hang)."""
        if self.child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signal.SIGKILL)
        self.process.kill()

    def close(self) -> None:
        """Stop the server, which exits at the end of its input (killed, with any child, after a failure)."""
        self.watchdog.cancel()
        if self.child is not None:
            self.kill()
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.kill()
                self.process.wait()
            self.process.stdout.close()


def child_environment() -> Dict[str, str]:
    """This environment with one OpenMP thread (other tests share the cores) and Python's warnings off."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def kill_delay(seed: int) -> float:
    """A seeded random time in the ``seed``-th of ``len(SEEDS)`` equal slices of the kill window.

    Slicing spreads the kills over the whole window, so that some land
    before the first checkpoint is written whatever the seeds.
    """
    slice_length = KILL_WINDOW_SECONDS / len(SEEDS)
    return (SEEDS.index(seed) + random.Random(seed).random()) * slice_length


def kill_at_random(server: TrainingServer, seed: int, root: str) -> KilledRun:
    """One run killed a seeded random time after it starts (EMA callback for even seeds, raw checkpoints for odd)."""
    delay = kill_delay(seed)
    kind = CALLBACKS[seed % len(CALLBACKS)]
    folder = os.path.join(root, f"seed-{seed}", "checkpoints")  # the callback creates it
    return KilledRun(seed, kind, delay, folder, server.kill_run(folder, kind, delay))


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory: pytest.TempPathFactory) -> Dict[int, KilledRun]:
    """One killed run per seed, one after the other."""
    root = str(tmp_path_factory.mktemp("fault-injection"))
    server = TrainingServer(os.path.join(root, "stderr.txt"))
    try:
        return {seed: kill_at_random(server, seed, root) for seed in SEEDS}
    finally:
        server.close()


# What the kill left, read independently of the library ------------------------


def folder_names(folder: str) -> List[str]:
    """The file names in ``folder`` (none if it was never created)."""
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def epoch_records(folder: str) -> List[Record]:
    """Every epoch-info file under its final name (not a ``.tmp-*`` leftover), with its params path."""
    records = []
    for name in folder_names(folder):
        if name.endswith(EPOCH_INFO_SUFFIX) and not name.startswith(TEMPORARY_PREFIX):
            records.append(Record(os.path.join(folder, name), referenced_params(os.path.join(folder, name))))
    return records


def referenced_params(info_path: str) -> Optional[str]:
    """The params file an epoch-info file points at (relative to its folder); ``None`` if it is not such JSON."""
    try:
        with open(info_path) as file:
            params_path = json.load(file).get("params_path")
    except (ValueError, AttributeError):
        return None
    return os.path.join(os.path.dirname(info_path), params_path) if isinstance(params_path, str) else None


def readable(path: str) -> bool:
    """Whether ``mx.nd.load`` reads ``path`` as named arrays."""
    if not os.path.isfile(path):
        return False
    try:
        return isinstance(mx.nd.load(path), dict)
    except mx.base.MXNetError:
        return False


def unusable_files(records: Sequence[Record]) -> List[str]:
    """The files that make a record unusable: its unparsable JSON, or its missing or unreadable params file."""
    return [record.params_path or record.info_path for record in records if not usable(record)]


def usable(record: Record) -> bool:
    """Whether the record's params file is readable."""
    return record.params_path is not None and readable(record.params_path)


def kill_phase(folder: str, records: Sequence[Record]) -> str:
    """Where the kill landed, as far as the files tell."""
    names = folder_names(folder)
    leftovers = [name.split("-", 2)[2] for name in names if name.startswith(TEMPORARY_PREFIX)]
    recorded = {os.path.basename(record.params_path or "") for record in records}
    orphans = [name for name in names if name.startswith("epoch-") and name.endswith(".params")]
    orphans = [name for name in orphans if name not in recorded]
    if not names:
        return "before the first checkpoint"
    if leftovers:
        return "writing " + ", ".join(leftovers)
    if orphans:
        return f"between {', '.join(orphans)} and its record (written, or being pruned)"
    return "between files"


# Averaging --------------------------------------------------------------------


def average_with_api(folder: str, caplog: pytest.LogCaptureFixture) -> Outcome:
    """``SelectNBestMean(num_models=3)``: its selection, then ``apply(folder)``, with the warnings logged."""
    strategy = SelectNBestMean(num_models=API_NUM_MODELS)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LIBRARY_LOGGER):
        try:
            selected, _ = strategy.select_checkpoints(strategy.get_checkpoint_information(folder))
            output = strategy.apply(folder)
        except CheckpointError as error:
            return Outcome(error=str(error), messages=caplog.text + str(error))
    return Outcome(output=output, selected=selected, messages=caplog.text)


def average_with_cli(folder: str, output: str, records: Sequence[Record], capsys: pytest.CaptureFixture) -> Outcome:
    """``modavg average FOLDER -o OUTPUT``: exit status 0 and the output path printed, or 1 and one error line."""
    assert len(records) <= CLI_DEFAULT_NUM_MODELS, "the callback keeps at most num_models + 1 = 4 records"
    capsys.readouterr()
    status = main(["average", folder, "-o", output])
    printed = capsys.readouterr()
    if status == 0:
        assert printed.out.strip() == output
        selected = [record.params_path for record in records if record.params_path is not None]
        return Outcome(output=output, selected=selected, messages=printed.err)
    assert status == 1, printed.err
    errors = [line for line in printed.err.splitlines() if line.startswith("modavg: error: ")]
    assert len(errors) == 1, printed.err
    return Outcome(error=errors[0], messages=printed.err)


# Checks -----------------------------------------------------------------------


def check_outcome(outcome: Outcome, folder: str, records: Sequence[Record], network_shapes: Optional[Shapes]) -> str:
    """A valid average of the usable selected files, or an error naming every unusable file; a summary."""
    unusable = unusable_files(records)
    if outcome.error is not None:
        assert not any(map(usable, records)), f"an error although usable records remain: {outcome.error}"
        for culprit in unusable or [folder]:
            assert os.path.basename(culprit) in outcome.messages, f"{culprit} is not named in: {outcome.messages}"
        return f"error ({len(unusable)} unusable)"
    assert not [path for path in outcome.selected if os.path.basename(path).startswith(TEMPORARY_PREFIX)]
    averaged = [path for path in outcome.selected if path not in unusable]
    assert averaged, f"nothing usable was selected, yet averaging succeeded: {outcome.selected}"
    for culprit in set(outcome.selected) & set(unusable):
        assert os.path.basename(culprit) in outcome.messages, f"skipped {culprit} is not named in: {outcome.messages}"
    check_valid_model(outcome.output, averaged, network_shapes)
    return f"averaged {len(averaged)} (skipped {len(outcome.selected) - len(averaged)})"


def load_float64(path: str) -> Dict[str, np.ndarray]:
    """A ``.params`` file's arrays as float64 NumPy arrays."""
    return {name: array.asnumpy().astype(np.float64) for name, array in mx.nd.load(path).items()}


def network_shape(shapes: Shapes, name: str) -> Tuple[int, ...]:
    """The shape of the network parameter that checkpoint name ``name`` stands for (its full name ends with it)."""
    matches = [shape for full_name, shape in shapes.items() if full_name.endswith(name)]
    assert len(matches) == 1, f"{name!r} matches {len(matches)} network parameters: {sorted(shapes)}"
    return matches[0]


def check_valid_model(output: str, inputs: Sequence[str], network_shapes: Optional[Shapes]) -> None:
    """``output`` loads, has the inputs' names and the network's shapes, and is the inputs' mean (float32 round-off)."""
    assert network_shapes is not None, "checkpoints exist, but the run was killed before its network was built"
    averaged = load_float64(output)
    checkpoints = [load_float64(path) for path in inputs]
    assert len(averaged) == len(network_shapes)
    for path, checkpoint in zip(inputs, checkpoints):
        assert sorted(checkpoint) == sorted(averaged), path
    for name, value in averaged.items():
        assert value.shape == network_shape(network_shapes, name), name
        assert np.all(np.isfinite(value)), name
        check_mean_of(value, np.stack([checkpoint[name] for checkpoint in checkpoints]), name)


def check_mean_of(value: np.ndarray, stacked: np.ndarray, name: str) -> None:
    """``value`` is within the element-wise range of ``stacked`` and equals its mean, to float32 round-off."""
    tolerance = FLOAT32_ULPS * np.abs(stacked).max(axis=0) + np.finfo(np.float32).tiny
    below, above = stacked.min(axis=0) - tolerance - value, value - stacked.max(axis=0) - tolerance
    outside = max(below.max(), above.max())
    assert outside <= 0, f"{name}: outside the element-wise range of the checkpoints by {outside}"
    error = np.abs(value - stacked.mean(axis=0)) - tolerance
    assert error.max() <= 0, f"{name}: differs from the NumPy mean beyond float32 round-off by {error.max()}"


def average_both_ways(
    folder: str,
    network_shapes: Optional[Shapes],
    output_folder: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> str:
    """Average ``folder`` with the command and with the API, check both outcomes; a summary of each."""
    records = epoch_records(folder)
    command = average_with_cli(folder, os.path.join(output_folder, "cli.params"), records, capsys)
    command_summary = check_outcome(command, folder, records, network_shapes)
    api_summary = check_outcome(average_with_api(folder, caplog), folder, records, network_shapes)
    return f"modavg: {command_summary}; apply: {api_summary}"


def cut_short(records: Sequence[Record], rng: random.Random) -> str:
    """Truncate the newest record's params file at a random length, as a kill would leave a file written in place."""
    newest = max((record.params_path for record in records if record.params_path), key=os.path.basename)
    with open(newest, "r+b") as file:
        file.truncate(int(rng.uniform(0.0, 1.0) * os.path.getsize(newest)))
    return newest


def report(line: str, capsys: pytest.CaptureFixture) -> None:
    """Print what happened to this seed (shown with ``pytest -s``, or with the failure)."""
    print(line)


# The tests --------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_averaging_after_a_kill_gives_a_valid_model_or_names_the_unusable_files(
    seed: int,
    killed_runs: Dict[int, KilledRun],
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> None:
    run = killed_runs[seed]
    phase = kill_phase(run.folder, epoch_records(run.folder))
    left = ", ".join(folder_names(run.folder)) or "no folder"
    outcomes = average_both_ways(run.folder, run.network_shapes, str(tmp_path), caplog, capsys)
    when = f"{run.kind}, killed {run.delay:.2f} s after the start, {run.epochs_done} epochs done"
    report(f"seed {seed} ({when}): {phase}; left {left}; {outcomes}", capsys)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_checkpoint_cut_short_in_a_killed_folder_is_skipped_and_named(
    seed: int,
    killed_runs: Dict[int, KilledRun],
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> None:
    """The same folders with their newest checkpoint truncated, as a writer without temporary files leaves it."""
    run = killed_runs[seed]
    if not epoch_records(run.folder):
        pytest.skip("killed before the first checkpoint: nothing to cut short")
    folder = str(tmp_path / "checkpoints")
    shutil.copytree(run.folder, folder)
    truncated = cut_short(epoch_records(folder), random.Random(seed))
    assert unusable_files(epoch_records(folder)) == [truncated]
    outcomes = average_both_ways(folder, run.network_shapes, str(tmp_path), caplog, capsys)
    report(f"seed {seed}, {os.path.basename(truncated)} cut to {os.path.getsize(truncated)} bytes: {outcomes}", capsys)
