"""The averaging engine, :class:`modavg_plugin.run.AveragingRun`, driven by a tiny fake host.

The host is two named ``mx.gluon.Parameter``s and a deterministic stand-in
for the optimiser: after global step ``k`` the raw weights are
``raw_at(k)``, written in place into every device copy. Every expected value
is computed here, apart from the library: the exponential averages in
float64 NumPy from the known trajectory (decay ``min(DECAY, (1 + n) / (10 +
n))`` for the ``n``-th averaged step, shadows starting from the weights at
``start()``), the strategies' means and the greedy soup from those. The
adapters' tests then only need to check how they translate their hooks.

Mutations of ``run.py`` each test was seen to catch are named in its comment.
"""

import gc
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional

import mxnet as mx
import numpy as np
import pytest
from numpy.testing import assert_allclose

from modavg_plugin import parameters as parameters_module
from modavg_plugin import run as run_module
from modavg_plugin.files import read_state_file
from modavg_plugin.registry import ConfigurationError
from modavg_plugin.run import STATE_NAME, AveragingRun, ResumedState

Arrays = Dict[str, np.ndarray]

SHAPES = {"dense0_weight": (2, 3), "dense0_bias": (3,)}
STEPS_PER_EPOCH = 3
SCORES = (3.0, 2.0, 4.0, 1.5, 2.5, 1.0)  # lower is better; NTA with n=1 fires after epoch 3 (4.0 > 3.0)
EPOCHS = len(SCORES)
STEPS = EPOCHS * STEPS_PER_EPOCH
DECAY = 0.6  # the warm-up (1 + n) / (10 + n) is below it for n <= 12 and above from n = 13: both regimes run
EMA = {"type": "exponential", "decay": DECAY}
NTA_EPOCH = 3  # the epoch after which {"type": "nta", "n": 1} starts the average (with SCORES)


# The fake host ---------------------------------------------------------------


def raw_at(step: int) -> Arrays:
    """The raw weights after global step ``step`` (float32, as the network holds them)."""
    return {
        name: np.sin(0.7 * step + index + np.arange(np.prod(shape))).reshape(shape).astype(np.float32)
        for index, (name, shape) in enumerate(SHAPES.items())
    }


def as_numpy(value: Any) -> np.ndarray:
    return value.asnumpy() if isinstance(value, mx.nd.NDArray) else np.asarray(value)


class FakeHost:
    """A network of named float32 Parameters, on one or several (CPU) devices."""

    def __init__(self, ctx: Any = None, step: int = 0) -> None:
        self.parameters: Dict[str, mx.gluon.Parameter] = {}
        for name, shape in SHAPES.items():
            parameter = mx.gluon.Parameter(name, shape=shape, dtype="float32")
            parameter.initialize(ctx=ctx or mx.cpu())
            self.parameters[name] = parameter
        self.write(raw_at(step))

    def items(self) -> List:
        return list(self.parameters.items())

    def write(self, arrays: Mapping[str, Any]) -> None:
        """Values by name into every device copy, in place (as an optimiser step does)."""
        for name, value in arrays.items():
            for copy in self.parameters[name].list_data():
                copy[:] = as_numpy(value).astype(np.float32)

    def weights(self) -> Arrays:
        """The first device copies, as float64."""
        return {name: p.list_data()[0].asnumpy().astype(np.float64) for name, p in self.parameters.items()}

    def copies(self, name: str) -> List[np.ndarray]:
        return [copy.asnumpy().astype(np.float64) for copy in self.parameters[name].list_data()]

    def assert_holds(self, expected: Mapping[str, np.ndarray], atol: float = 1e-6) -> None:
        """Every device copy of every parameter equals ``expected``."""
        for name in SHAPES:
            for copy in self.copies(name):
                assert_allclose(copy, expected[name], rtol=0, atol=atol, err_msg=name)


@dataclass
class Trained:
    """What the host saw while it drove the engine."""

    resumed: Optional[ResumedState] = None
    paths: List[Optional[str]] = field(default_factory=list)  # end_epoch's return values
    averaged: List[Arrays] = field(default_factory=list)  # the network inside run.averaged(), per epoch
    raw_after: List[Arrays] = field(default_factory=list)  # the network after that block


def train(
    run: AveragingRun,
    host: FakeHost,
    *,
    epochs: int = EPOCHS,
    stop_after: Optional[int] = None,
    finish: bool = True,
    measure: Optional[Callable[[], float]] = None,
    metrics: Optional[Callable[[int], Dict[str, float]]] = None,
    notes: Optional[Callable[[int], Dict[str, float]]] = None,
    write: Optional[Callable[[Mapping[str, mx.nd.NDArray]], None]] = None,
    on_epoch_end: Optional[Callable[[int], None]] = None,
) -> Trained:
    """Drive ``run`` as a host does: resume, start, step, validate the averages, end each epoch, finish.

    ``stop_after=k`` stops after epoch ``k`` (1-based) without finishing: a killed run.
    """
    trained = Trained(resumed=run.resume())
    if trained.resumed is not None:
        host.write(trained.resumed.raw)
    run.start(host.items(), write=write, epochs_ahead=epochs - run.epochs_done)
    for epoch in range(run.epochs_done, epochs):
        for batch in range(STEPS_PER_EPOCH):
            host.write(raw_at(epoch * STEPS_PER_EPOCH + batch + 1))  # the host's own step count
            run.step()
        with run.averaged():
            trained.averaged.append(host.weights())
        trained.raw_after.append(host.weights())
        done = epoch + 1
        trained.paths.append(
            run.end_epoch(
                score=SCORES[epoch],
                metrics=metrics(epoch) if metrics else None,
                notes=notes(epoch) if notes else None,
                state_extras=lambda done=done: ({"host_epochs": done}, {"momentum": mx.nd.full((2,), done)}),
            )
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        if stop_after == done:
            return trained
    if finish:
        run.finish(measure=measure)
    return trained


# Expected values, computed apart from the library ------------------------------


def f64(arrays: Mapping[str, Any]) -> Arrays:
    return {name: as_numpy(value).astype(np.float64) for name, value in arrays.items()}


def ema_trajectory(start_step: Optional[int] = 0, decay: float = DECAY) -> List[Arrays]:
    """The exponential average after each step 0..STEPS, in float64.

    The shadows start as the weights at ``start()`` (``raw_at(0)``) and follow
    the weights up to ``start_step``; the ``n``-th step after it has decay
    ``min(decay, (1 + n) / (10 + n))``.
    """
    shadow = f64(raw_at(0))
    trajectory = [shadow]
    for step in range(1, STEPS + 1):
        raw = f64(raw_at(step))
        if start_step is None or step <= start_step:
            shadow = raw
        else:
            n = step - start_step
            d = min(decay, (1.0 + n) / (10.0 + n))
            shadow = {name: d * shadow[name] + (1.0 - d) * raw[name] for name in raw}
        trajectory.append(shadow)
    return trajectory


def at_epoch_ends(trajectory: List[Arrays]) -> List[Arrays]:
    return [trajectory[(epoch + 1) * STEPS_PER_EPOCH] for epoch in range(EPOCHS)]


def raw_at_epoch_ends() -> List[Arrays]:
    return [f64(raw_at((epoch + 1) * STEPS_PER_EPOCH)) for epoch in range(EPOCHS)]


def mean_of(arrays: List[Mapping[str, np.ndarray]]) -> Arrays:
    return {name: np.mean([np.asarray(a[name], dtype=np.float64) for a in arrays], axis=0) for name in SHAPES}


def best_epochs(count: int, upto: int = EPOCHS) -> List[int]:
    """The indices of the ``count`` lowest scores among the first ``upto`` epochs, best first."""
    return sorted(range(upto), key=lambda epoch: (SCORES[epoch], epoch))[:count]


def as_float32(arrays: Mapping[str, np.ndarray]) -> Arrays:
    """What a checkpoint file holds of ``arrays``."""
    return {name: value.astype(np.float32).astype(np.float64) for name, value in arrays.items()}


def load(path: str) -> Arrays:
    return f64(mx.nd.load(path))


def assert_arrays_close(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], atol=1e-6) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert_allclose(actual[name], expected[name], rtol=0, atol=atol, err_msg=name)


def checkpoint_files(folder: str) -> List[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith((".params", ".json")) and name != STATE_NAME)


def messages(caplog, logger: str, level: int) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == level]


# 1. The moving average ---------------------------------------------------------


def test_final_moving_average_equals_a_numpy_ema_in_every_device_copy(tmp_path):
    # Caught: step() calling moving_average.apply() without num_updates (no warm-up); finish() not writing
    # the moving average without a strategy; averaged() not swapping the raw weights back.
    host = FakeHost(ctx=[mx.cpu(0), mx.cpu(1)])
    run = AveragingRun(EMA, checkpoint_dir=str(tmp_path))
    trained = train(run, host)

    expected = ema_trajectory()
    for epoch in range(EPOCHS):
        assert_arrays_close(trained.averaged[epoch], expected[(epoch + 1) * STEPS_PER_EPOCH])
        assert_arrays_close(trained.raw_after[epoch], f64(raw_at((epoch + 1) * STEPS_PER_EPOCH)))
    host.assert_holds(expected[STEPS])  # finish() without a strategy leaves the EMA, in both device copies
    assert len(host.copies("dense0_weight")) == 2
    assert run.num_updates == STEPS and run.epochs_done == EPOCHS


def test_shadows_start_from_the_weights_at_start_not_at_construction(tmp_path):
    host = FakeHost(step=-5)
    run = AveragingRun(EMA)
    host.write(raw_at(0))  # changed between construction and start(): start() is what counts
    train(run, host)
    host.assert_holds(ema_trajectory()[STEPS])


# 2. Checkpoints ------------------------------------------------------------------


@pytest.mark.parametrize(("first_epoch_no", "file_stem"), [(0, "epoch"), (1, "model")])
def test_checkpoints_are_numbered_recorded_pruned_to_the_strategys_choice_and_averaged(
    tmp_path, first_epoch_no, file_stem
):
    # Caught: end_epoch numbering from 0 whatever first_epoch_no; the checkpoint holding the raw weights
    # instead of epoch_weights(); records without the extra metrics.
    folder = str(tmp_path / "out")
    host = FakeHost()
    run = AveragingRun(
        EMA, {"type": "mean", "num_models": 2}, folder, file_stem=file_stem, first_epoch_no=first_epoch_no
    )
    averages = at_epoch_ends(ema_trajectory())
    listings = []
    trained = train(
        run,
        host,
        metrics=lambda epoch: {"accuracy": 0.125 * epoch},
        on_epoch_end=lambda epoch: listings.append(checkpoint_files(folder)),
    )

    def stem(epoch: int) -> str:
        return f"{file_stem}-{epoch + first_epoch_no:04d}"

    for epoch, path in enumerate(trained.paths):
        assert path == os.path.join(folder, f"{stem(epoch)}.params")
        kept = best_epochs(2, upto=epoch + 1)
        assert listings[epoch] == sorted(
            name
            for kept_epoch in kept
            for name in (f"{stem(kept_epoch)}.params", f"{stem(kept_epoch)}-epoch-info.json")
        )
    for epoch in best_epochs(2):  # the files that stayed: their records and their arrays
        with open(os.path.join(folder, f"{stem(epoch)}-epoch-info.json")) as file:
            record = json.load(file)
        assert record == {
            "params_path": f"{stem(epoch)}.params",
            "epoch_no": epoch + first_epoch_no,
            "accuracy": 0.125 * epoch,
            "score": SCORES[epoch],
            "run_id": run.run_id,  # every record names the run that wrote it
        }
        assert_arrays_close(load(os.path.join(folder, f"{stem(epoch)}.params")), as_float32(averages[epoch]))
    host.assert_holds(mean_of([as_float32(averages[epoch]) for epoch in best_epochs(2)]))
    assert os.path.isfile(os.path.join(folder, STATE_NAME))


def test_without_a_strategy_only_the_latest_checkpoint_is_kept(tmp_path):
    folder = str(tmp_path)
    run = AveragingRun(EMA, checkpoint_dir=folder)
    listings = []
    train(run, FakeHost(), on_epoch_end=lambda epoch: listings.append(checkpoint_files(folder)))
    assert listings == [[f"epoch-{epoch:04d}-epoch-info.json", f"epoch-{epoch:04d}.params"] for epoch in range(EPOCHS)]
    assert_arrays_close(load(os.path.join(folder, "epoch-0005.params")), as_float32(ema_trajectory()[STEPS]))


# 3. Checkpoints only --------------------------------------------------------------


def test_checkpoints_only_hold_the_raw_weights_and_end_with_the_mean_of_the_best_raw_epochs(tmp_path):
    folder = str(tmp_path)
    host = FakeHost()
    run = AveragingRun(None, {"type": "mean", "num_models": 2}, folder)
    trained = train(run, host)
    raw = raw_at_epoch_ends()
    for epoch in range(EPOCHS):
        assert_arrays_close(trained.averaged[epoch], raw[epoch])  # averaged() changes nothing: no average
    for epoch in best_epochs(2):
        assert_arrays_close(load(os.path.join(folder, f"epoch-{epoch:04d}.params")), raw[epoch])
    host.assert_holds(mean_of([raw[epoch] for epoch in best_epochs(2)]))


# 4. Triggers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trigger", "name", "epoch"),
    [({"type": "nta", "n": 1}, "nta", NTA_EPOCH), ({"type": "alpha_suffix", "alpha": 0.7}, "alpha_suffix", 2)],
)
def test_a_trigger_starts_the_average_after_the_epoch_where_its_rule_fires(tmp_path, caplog, trigger, name, epoch):
    # NTA n=1: epoch 3 scores 4.0, worse than epoch 1's 3.0. alpha_suffix 0.7 of 6 epochs: from 6 * 0.3 = 1.8.
    # Caught: _consult_trigger fed the score of the epoch before; the trigger consulted before epochs_done counts
    # the epoch (starts one epoch late).
    host = FakeHost()
    run = AveragingRun(EMA, checkpoint_dir=str(tmp_path), trigger=trigger)
    with caplog.at_level(logging.INFO, logger="modavg_plugin"):
        trained = train(run, host)
    start_step = epoch * STEPS_PER_EPOCH
    expected = ema_trajectory(start_step=start_step)
    for done in range(1, EPOCHS + 1):
        assert_arrays_close(trained.averaged[done - 1], expected[done * STEPS_PER_EPOCH])
        if done <= epoch:  # not started yet: the shadows follow the weights
            assert_arrays_close(trained.averaged[done - 1], f64(raw_at(done * STEPS_PER_EPOCH)))
    host.assert_holds(expected[STEPS])
    started = [m for m in messages(caplog, "modavg_plugin.run", logging.INFO) if "trigger starts" in m]
    assert started == [f"the {name} trigger starts the average after epoch {epoch} (update {start_step})"]


# 5. Resume --------------------------------------------------------------------------

RESUME_CONFIGS = {
    "ema+mean": dict(average=EMA, avg_strategy={"type": "mean", "num_models": 2}),
    "nta+posthoc": dict(average=EMA, trigger={"type": "nta", "n": 1}, posthoc={"sigma_rels": [0.05, 0.1]}),
    "checkpoints-only": dict(average=None, avg_strategy={"type": "softmax", "num_models": 3}),
}


def folder_contents(folder: str) -> Dict[str, Any]:
    """The files of a folder (not the state): JSON records as dicts, ``.params`` as arrays."""
    contents: Dict[str, Any] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".json"):
            with open(path) as file:
                contents[name] = {key: value for key, value in json.load(file).items() if key != "run_id"}
        elif name.endswith(".params") and name != STATE_NAME:
            contents[name] = load(path)
    return contents


def assert_same_contents(actual: Dict[str, Any], expected: Dict[str, Any]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        if name.endswith(".params"):
            assert_arrays_close(actual[name], value)
        else:
            assert actual[name] == value, name


@pytest.mark.parametrize("config", sorted(RESUME_CONFIGS))
@pytest.mark.parametrize("stop_after", [2, 4])  # before and after the NTA trigger fires (epoch 3)
def test_a_killed_run_resumed_ends_as_an_uninterrupted_one(tmp_path, config, stop_after):
    # Caught: _save_state without the trigger's state; resume() not restoring num_updates; the post-hoc
    # averages not reloaded (_load_pending skipping them); extras filtered out of resume()'s answer.
    options = RESUME_CONFIGS[config]
    whole_folder, parts_folder = str(tmp_path / "whole"), str(tmp_path / "parts")
    whole = FakeHost()
    train(AveragingRun(checkpoint_dir=whole_folder, **options), whole)

    train(AveragingRun(checkpoint_dir=parts_folder, **options), FakeHost(), stop_after=stop_after)  # killed
    gc.collect()  # what dies with a killed process: here, the first run's lock on the folder
    host = FakeHost(step=-7)  # a new process: the weights it starts with are not the trained ones
    run = AveragingRun(checkpoint_dir=parts_folder, resume=True, **options)
    trained = train(run, host)

    resumed = trained.resumed
    assert resumed is not None and run.resumed
    assert_arrays_close(f64(resumed.raw), f64(raw_at(stop_after * STEPS_PER_EPOCH)))
    assert resumed.extras == {"host_epochs": stop_after}
    assert list(resumed.arrays) == ["momentum"] and resumed.blobs == {}
    assert_allclose(resumed.arrays["momentum"].asnumpy(), [stop_after, stop_after])
    assert len(trained.averaged) == EPOCHS - stop_after  # it went on from epoch stop_after + 1
    assert run.num_updates == STEPS
    host.assert_holds(whole.weights())
    assert_same_contents(folder_contents(parts_folder), folder_contents(whole_folder))  # the kept checkpoints
    if "posthoc" in options:
        posthoc = folder_contents(os.path.join(parts_folder, "posthoc"))
        assert len(posthoc) == 2 * 2 * EPOCHS  # two widths, a file and a record per epoch
        assert_same_contents(posthoc, folder_contents(os.path.join(whole_folder, "posthoc")))
    if "trigger" in options:
        host.assert_holds(ema_trajectory(start_step=NTA_EPOCH * STEPS_PER_EPOCH)[STEPS])


def test_resume_without_a_saved_state_starts_afresh(tmp_path):
    run = AveragingRun(EMA, checkpoint_dir=str(tmp_path), resume=True)
    host = FakeHost()
    trained = train(run, host)
    assert trained.resumed is None and not run.resumed
    host.assert_holds(ema_trajectory()[STEPS])


# 6. Greedy soup ------------------------------------------------------------------------


def greedy_soup(candidates: List[Arrays], loss: Callable[[Mapping[str, np.ndarray]], float]) -> List[int]:
    """Recipe 1 of the model-soups paper: the candidates' indices the soup keeps (best candidate first)."""
    kept, best = [0], loss(candidates[0])
    for index in range(1, len(candidates)):
        score = loss(mean_of([candidates[i] for i in [*kept, index]]))
        if score < best:
            kept, best = [*kept, index], score
    return kept


def test_greedy_soup_evaluates_each_candidate_in_the_network_and_restores_it_between(tmp_path):
    # Caught: evaluation() not writing the kept weights back after measure() (no restore between candidates);
    # the greedy strategy given no evaluation when measure is given.
    folder = str(tmp_path)
    host = FakeHost()
    candidates = [as_float32(at_epoch_ends(ema_trajectory())[epoch]) for epoch in best_epochs(3)]
    target = mean_of([candidates[0], candidates[2]])

    def loss(arrays: Mapping[str, np.ndarray]) -> float:
        return float(sum(np.sum((np.asarray(arrays[name]) - target[name]) ** 2) for name in SHAPES))

    kept = greedy_soup(candidates, loss)
    assert kept == [0, 2]  # the data make the soup reject a candidate: the test means something

    writes: List[Arrays] = []
    measured: List[Arrays] = []

    def write(arrays: Mapping[str, mx.nd.NDArray]) -> None:  # the host's own writer, as start(write=...) allows
        writes.append(f64(arrays))
        host.write(arrays)

    def measure() -> float:
        for name in SHAPES:  # every device copy holds the candidate
            copies = host.copies(name)
            assert all(np.array_equal(copy, copies[0]) for copy in copies[1:])
        measured.append(host.weights())
        return loss(host.weights())

    run = AveragingRun(EMA, {"type": "greedy", "num_models": 3}, folder)
    train(run, host, write=write, measure=measure)

    tried = [candidates[0], mean_of(candidates[:2]), mean_of([candidates[0], candidates[2]])]
    assert len(measured) == 3
    for seen, expected in zip(measured, tried):
        assert_arrays_close(seen, expected)
    raw = f64(raw_at(STEPS))  # the network's weights when finish() was called
    assert len(writes) == 7  # candidate, weights back, three times; then the soup
    for index in range(3):
        assert_arrays_close(writes[2 * index], tried[index])
        assert_arrays_close(writes[2 * index + 1], raw)
    soup = mean_of([candidates[index] for index in kept])
    assert_arrays_close(writes[6], soup)
    host.assert_holds(soup)
    assert [trial["kept"] for trial in run.strategy.trials] == [True, False, True]


def test_greedy_without_measure_warns_and_keeps_the_best_ranked_checkpoint(tmp_path, caplog):
    host = FakeHost()
    run = AveragingRun(EMA, {"type": "greedy", "num_models": 3}, str(tmp_path))
    with caplog.at_level(logging.INFO, logger="modavg_plugin"):
        train(run, host)
    warnings = messages(caplog, "modavg_plugin.run_end", logging.WARNING)
    assert len(warnings) == 1 and "needs validation data" in warnings[0]
    host.assert_holds(as_float32(at_epoch_ends(ema_trajectory())[best_epochs(1)[0]]))


# 7. Fallback ------------------------------------------------------------------------------


def test_a_failing_checkpoint_average_is_logged_and_leaves_the_final_moving_average(tmp_path, monkeypatch, caplog):
    # Caught: finish() returning right after a failed checkpoint average (the network keeping its raw weights).
    host = FakeHost()
    run = AveragingRun(EMA, {"type": "mean", "num_models": 2}, str(tmp_path))

    def fail(paths, weights):
        raise OSError("disk on fire")

    monkeypatch.setattr(run.strategy, "average", fail)
    with caplog.at_level(logging.INFO, logger="modavg_plugin"):
        train(run, host)
    errors = messages(caplog, "modavg_plugin.run_end", logging.ERROR)
    assert len(errors) == 1
    assert "checkpoint averaging failed" in errors[0] and "disk on fire" in errors[0]
    assert "the final moving average" in errors[0]
    host.assert_holds(ema_trajectory()[STEPS])


def test_a_checkpoint_average_whose_write_stops_part_way_leaves_the_raw_weights(tmp_path, monkeypatch, caplog):
    # Caught: without a moving average to fall back on, the network kept the first parameter of the average and
    # the raw second one (the "fallback" to "its last raw weights" was whatever the failed write left).
    host = FakeHost()
    run = AveragingRun(None, {"type": "mean", "num_models": 2}, str(tmp_path))
    real_write = parameters_module.write_into_parameters
    calls = []

    def write_one_then_fail(arrays, targets, what):
        calls.append(what)
        if len(calls) == 1:  # the average: its first parameter lands, then the "disk" fails
            real_write(arrays, targets[:1], what)
            raise OSError("device lost")
        real_write(arrays, targets, what)

    monkeypatch.setattr(run_module, "write_into_parameters", write_one_then_fail)
    with caplog.at_level(logging.INFO, logger="modavg_plugin"):
        train(run, host)
    errors = messages(caplog, "modavg_plugin.run_end", logging.ERROR)
    assert len(errors) == 1 and "device lost" in errors[0] and "its last raw weights" in errors[0]
    host.assert_holds(raw_at(STEPS))


# 8. Abandon and folders ----------------------------------------------------------------------


def test_abandon_after_swap_average_puts_the_raw_weights_back_and_removes_the_temporary_folder(caplog):
    # Caught: abandon() without swap_raw() (the network keeps the averages).
    host = FakeHost()
    run = AveragingRun(EMA, {"type": "mean", "num_models": 2})
    trained = train(run, host, stop_after=2)
    folder = os.path.dirname(trained.paths[-1])
    assert os.path.isdir(folder)
    run.swap_average()
    assert_arrays_close(host.weights(), ema_trajectory()[2 * STEPS_PER_EPOCH])
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        run.abandon()
    host.assert_holds(f64(raw_at(2 * STEPS_PER_EPOCH)))
    assert not os.path.exists(folder)
    assert any("training failed" in m for m in messages(caplog, "modavg_plugin.run_end", logging.WARNING))


def test_finish_removes_a_temporary_folder():
    run = AveragingRun(EMA, {"type": "mean", "num_models": 2})
    host = FakeHost()
    trained = train(run, host)
    assert all(path is not None for path in trained.paths)
    assert not os.path.exists(os.path.dirname(trained.paths[-1]))
    host.assert_holds(mean_of([as_float32(at_epoch_ends(ema_trajectory())[epoch]) for epoch in best_epochs(2)]))


def test_a_given_folder_is_kept_after_finish_and_abandon(tmp_path):
    finished, abandoned = str(tmp_path / "finished"), str(tmp_path / "abandoned")
    train(AveragingRun(EMA, "mean", finished), FakeHost())
    run = AveragingRun(EMA, "mean", abandoned)
    train(run, FakeHost(), stop_after=2)
    run.abandon()
    assert len(checkpoint_files(finished)) == 2 * min(5, EPOCHS)  # "mean" keeps num_models=5
    assert checkpoint_files(abandoned) == [
        "epoch-0000-epoch-info.json",
        "epoch-0000.params",
        "epoch-0001-epoch-info.json",
        "epoch-0001.params",
    ]


# 9. Configuration errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(average="exponentail"), r"'exponentail' is not a registered MovingAverage.*did you mean 'exponential'"),
        (dict(average={"type": "exponential", "decy": 0.9}), r"unknown key 'decy' for 'exponential'.*'decay'"),
        (dict(average={"type": "exponential", "shadow_context": "cpu"}), r"'shadow_context' is not part"),
        (dict(average={"type": "exponential", "parameters": []}), r"'parameters' is not part"),
        (dict(average={"type": "exponential", "decay": 1.5}), r"decay must be a number in \[0, 1\], got 1\.5"),
        (dict(average={"type": "cumulative", "start_step": -1}), r"start_step must be an integer >= 0"),
        (dict(resume=True), r"resume=True needs a checkpoint folder"),
        (dict(posthoc={}), r"posthoc needs a checkpoint folder"),
        (dict(posthoc={"every": 2}, checkpoint_dir="x"), r"posthoc: unknown key 'every'"),
        (dict(average=None, avg_strategy="mean", trigger={"type": "nta"}), r"a trigger starts a moving average"),
        (dict(average=None), r"give a moving average, an avg_strategy, or both"),
        (dict(avg_strategy="meen"), r"did you mean 'mean'"),
        (
            dict(avg_strategy={"type": "mean", "metric": "accuracy", "maximize": True}, metric_names=()),
            r"avg_strategy.metric is 'accuracy', but the epochs record only \['score'\]",
        ),
    ],
)
def test_configuration_errors_are_raised_at_construction_naming_the_culprit(options, match):
    with pytest.raises(ConfigurationError, match=match):
        AveragingRun(**options)


def test_an_unrecorded_strategy_metric_is_refused_at_the_first_epoch_end(tmp_path):
    run = AveragingRun(EMA, {"type": "mean", "metric": "accuracy", "maximize": True}, str(tmp_path))
    with pytest.raises(ConfigurationError, match=r"avg_strategy.metric is 'accuracy'.*\['loss', 'score'\]"):
        train(run, FakeHost(), metrics=lambda epoch: {"loss": 1.0})
    assert run.epochs_done == 0 and checkpoint_files(str(tmp_path)) == []


def test_ranking_accuracy_lowest_first_is_warned_about_once_at_the_first_epoch_end(tmp_path, caplog):
    run = AveragingRun(EMA, {"type": "mean", "metric": "accuracy"}, str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        run.start(FakeHost().items())
        assert messages(caplog, "modavg_plugin.run", logging.WARNING) == []
        for score in (1.0, 2.0):
            run.step()
            run.end_epoch(score=score, metrics={"accuracy": 0.5})
    warnings = messages(caplog, "modavg_plugin.run", logging.WARNING)
    assert len(warnings) == 1 and "pass maximize=True" in warnings[0]


@pytest.mark.parametrize("score_name, warned", [("loss", False), ("accuracy", True)])
def test_the_score_is_a_loss_unless_the_host_says_otherwise(tmp_path, caplog, score_name, warned):
    """A loss as the score next to an accuracy metric is ranked right: no warning (the score is not the first metric)."""
    run = AveragingRun(EMA, "mean", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        run.start(FakeHost().items())
        run.step()
        run.end_epoch(score=0.3, metrics={"accuracy": 0.9}, score_name=score_name)
    warnings = messages(caplog, "modavg_plugin.run", logging.WARNING)
    assert warnings == (
        ["avg_strategy ranks 'score' (= accuracy) lowest first; accuracy is better when higher: pass maximize=True"]
        if warned
        else []
    )


def test_host_state_extras_cannot_overwrite_the_runs_own_state(tmp_path):
    run = AveragingRun(EMA, checkpoint_dir=str(tmp_path))
    run.start(FakeHost().items())
    run.step()
    with pytest.raises(ValueError, match="state_extras: key 'num_updates' is the run's own"):
        run.end_epoch(score=1.0, state_extras=lambda: ({"num_updates": 0}, {}))


def test_a_trigger_without_the_number_of_epochs_is_refused_at_start():
    run = AveragingRun(EMA, trigger={"type": "nta", "n": 1})
    with pytest.raises(ConfigurationError, match="a trigger needs the number of epochs"):
        run.start(FakeHost().items(), epochs_ahead=None)


# 10. Writer and state ----------------------------------------------------------------------


def test_a_non_writer_writes_no_files_but_its_averages_still_move(tmp_path):
    folder = str(tmp_path / "out")
    host = FakeHost()
    run = AveragingRun(EMA, {"type": "mean", "num_models": 2}, folder, posthoc={})
    run.writer = False
    trained = train(run, host)
    assert trained.paths == [None] * EPOCHS
    assert not os.path.exists(folder) or os.listdir(folder) == []
    expected = ema_trajectory()
    for epoch in range(EPOCHS):
        assert_arrays_close(trained.averaged[epoch], expected[(epoch + 1) * STEPS_PER_EPOCH])
    host.assert_holds(expected[STEPS])  # no checkpoints to average: the final moving average


def test_saves_state_false_writes_checkpoints_but_no_state_file(tmp_path):
    folder = str(tmp_path)
    run = AveragingRun(EMA, {"type": "mean", "num_models": 2}, folder)
    run.saves_state = False
    train(run, FakeHost())
    assert not os.path.exists(os.path.join(folder, STATE_NAME))
    assert len(checkpoint_files(folder)) == 4


# 11. History ---------------------------------------------------------------------------------


def test_history_has_an_entry_per_epoch_kept_in_the_state_and_given_back_on_resume(tmp_path):
    # Caught: resume() not restoring the history.
    folder = str(tmp_path)
    options = dict(average=EMA, avg_strategy="mean", checkpoint_dir=folder, first_epoch_no=1)

    def notes(epoch: int) -> Dict[str, float]:
        return {"raw_validation_loss": 10.0 + epoch}

    def metrics(epoch: int) -> Dict[str, float]:
        return {"accuracy": 0.25 * epoch}

    run = AveragingRun(**options)
    train(run, FakeHost(), stop_after=3, notes=notes, metrics=metrics)
    expected = [{"epoch_no": epoch + 1, **notes(epoch), **metrics(epoch)} for epoch in range(3)]
    assert run.history == expected
    state, _, _ = read_state_file(os.path.join(folder, STATE_NAME))
    assert state["history"] == expected and state["epochs_done"] == 3
    del run
    gc.collect()  # killed: its lock on the folder goes with it

    resumed = AveragingRun(resume=True, **options)
    resumed.resume()
    assert resumed.history == expected and resumed.epochs_done == 3
