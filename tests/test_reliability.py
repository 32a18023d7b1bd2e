"""Tampered files, shared folders and bad input: nothing outside the folder is touched, nothing is unpickled,
one run per folder, and every bad input is one clear error (or a skipped record) rather than a traceback."""

import gc
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import time

import mxnet as mx
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from modavg_plugin import AveragingRun, CheckpointError, ExponentialMovingAverage
from modavg_plugin.cli import main
from modavg_plugin.files import read_state_file, save_state_file
from modavg_plugin.module import ModuleAveraging
from modavg_plugin.run import STATE_NAME

from conftest import data_iterator, fit_arguments, new_module, seed_everything


def parameters(seed: int = 0):
    rng = np.random.RandomState(seed)
    pairs = []
    for name, shape in (("w", (3, 2)), ("b", (3,))):
        parameter = mx.gluon.Parameter(name, shape=shape)
        parameter.initialize()
        parameter.set_data(mx.nd.array(rng.randn(*shape)))
        pairs.append((name, parameter))
    return pairs


def epochs(run: AveragingRun, pairs, count: int, scores=(3.0, 1.0, 2.0, 0.5, 4.0, 0.25)) -> None:
    for _ in range(count):
        for _, parameter in pairs:
            parameter.set_data(parameter.data() + 0.1)
        run.step()
        run.end_epoch(score=scores[(run.epochs_done) % len(scores)])


# Nothing outside the folder is deleted or read because of what a state file says ------------------------------


@pytest.mark.parametrize("outside", ["../precious.txt", "ABSOLUTE", "sub/../../precious.txt"])
def test_a_tampered_state_record_never_reaches_outside_the_folder(tmp_path, caplog, outside):
    folder = tmp_path / "run"
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    run = AveragingRun(avg_strategy={"type": "mean", "num_models": 1}, checkpoint_dir=str(folder))
    pairs = parameters()
    run.start(pairs)
    epochs(run, pairs, 2)
    run = None
    gc.collect()  # killed: the files stay, the lock goes with the process
    state, arrays, _ = read_state_file(str(folder / STATE_NAME))
    name = str(precious) if outside == "ABSOLUTE" else outside
    state["records"] = [{**state["records"][0], "params_path": name, "info_path": name, "score": -100.0}]
    save_state_file(str(folder / STATE_NAME), state, arrays, blobs={})

    resumed = AveragingRun(avg_strategy={"type": "mean", "num_models": 1}, checkpoint_dir=str(folder), resume=True)
    with caplog.at_level("WARNING", logger="modavg_plugin"):
        resumed.resume()
        resumed.start(pairs)
        epochs(resumed, pairs, 2)  # the best-scoring record would be pruned away: never the outside file
        resumed.finish()
    assert precious.read_text() == "keep me"
    assert "resuming without a saved checkpoint record" in caplog.text
    assert "is not a file name" in caplog.text or "outside" in caplog.text


# No code from files: the Module's optimiser state is arrays, an old pickle is read for arrays only ------------


def module_averaging(folder, resume=False, **options):
    return ModuleAveraging(
        new_module([mx.cpu()]), "exponential", checkpoint_prefix=str(folder / "model"), resume=resume, **options
    )


def test_the_module_state_holds_the_optimiser_as_arrays_and_no_pickle(tmp_path):
    seed_everything()
    module_averaging(tmp_path).fit(data_iterator(0), **fit_arguments())
    state, arrays, blobs = read_state_file(str(tmp_path / "model-averaging-state.params"))
    assert blobs == {}  # no state:optimizer bytes
    assert state["optimizer_type"] == "Adam" and state["optimizer_states"]
    assert any(name.startswith("host:optimizer:") for name in arrays)


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_an_old_state_whose_pickle_holds_code_is_refused_and_the_code_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seed_everything()
    averaging = module_averaging(tmp_path, resume=True)
    averaging.fit(data_iterator(0), **{**fit_arguments(), "num_epoch": 1})
    state, arrays, _ = read_state_file(str(tmp_path / "model-averaging-state.params"))
    for key in ("optimizer_type", "optimizer_states"):
        state.pop(key)  # as files written before this version: the optimiser as a pickle
    arrays = {name: value for name, value in arrays.items() if not name.startswith("host:")}
    save_state_file(
        str(tmp_path / "model-averaging-state.params"), state, arrays, {"optimizer": pickle.dumps({0: Exploit()})}
    )
    del averaging
    gc.collect()
    with pytest.raises(CheckpointError, match=r"refers to posix\.system; only arrays are read back"):
        module_averaging(tmp_path, resume=True).fit(data_iterator(0), **fit_arguments())
    assert not (tmp_path / "pwned").exists()


def test_resuming_a_module_with_another_optimiser_or_architecture_is_one_clear_error(tmp_path):
    seed_everything()
    module_averaging(tmp_path).fit(data_iterator(0), **{**fit_arguments(), "num_epoch": 1})
    gc.collect()
    with pytest.raises(
        CheckpointError, match=r"cannot resume from .*: the saved optimiser state is Adam's, and this fit uses SGD"
    ):
        module_averaging(tmp_path, resume=True).fit(data_iterator(0), **{**fit_arguments(), "optimizer": "sgd"})
    gc.collect()
    data = mx.sym.Variable("data")
    other = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(data, num_hidden=3, name="fc1"), name="softmax")
    averaging = ModuleAveraging(
        mx.mod.Module(other), "exponential", checkpoint_prefix=str(tmp_path / "model"), resume=True
    )
    with pytest.raises(
        CheckpointError,
        match=r"the saved weights do not fit this module: 'arg:bn1_beta' is \(16,\) in the state, missing in the module",
    ):
        averaging.fit(data_iterator(0), **fit_arguments())


# One run per folder -------------------------------------------------------------------------------------------


def test_a_second_run_on_a_folder_with_an_earlier_runs_files_is_refused_unless_it_resumes(tmp_path):
    first = AveragingRun(checkpoint_dir=str(tmp_path))
    pairs = parameters()
    first.start(pairs)
    epochs(first, pairs, 2)
    first.finish()
    with pytest.raises(CheckpointError, match=r"already holds files of an earlier run .*epoch-0001-epoch-info\.json"):
        AveragingRun(checkpoint_dir=str(tmp_path)).start(pairs)
    resumed = AveragingRun(checkpoint_dir=str(tmp_path), resume=True)
    assert resumed.resume() is not None and resumed.run_id == first.run_id
    resumed.start(pairs)


def test_a_second_live_run_on_the_same_folder_is_refused_naming_it(tmp_path):
    pairs = parameters()
    first = AveragingRun(checkpoint_dir=str(tmp_path))
    first.start(pairs)
    message = f"checkpoint folder {tmp_path} is in use by another run \\(process {os.getpid()}\\)"
    with pytest.raises(CheckpointError, match=message):
        AveragingRun(checkpoint_dir=str(tmp_path)).start(pairs)
    first.finish()  # releases the lock
    AveragingRun(checkpoint_dir=str(tmp_path)).start(pairs)  # nothing saved: a new run may use the folder


def test_a_killed_run_does_not_leave_its_folder_locked(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time, mxnet as mx
        from modavg_plugin import AveragingRun
        p = mx.gluon.Parameter("w", shape=(2,)); p.initialize()
        run = AveragingRun(checkpoint_dir={str(tmp_path)!r}); run.start([("w", p)]); run.step(); run.end_epoch(score=1.0)
        print("locked", flush=True); time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match="is in use by another run"):
            AveragingRun(checkpoint_dir=str(tmp_path), resume=True).resume()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    deadline = time.time() + 10
    while True:  # the kernel releases the lock with the process
        try:
            resumed = AveragingRun(checkpoint_dir=str(tmp_path), resume=True)
            assert resumed.resume() is not None and resumed.epochs_done == 1
            break
        except CheckpointError:
            assert time.time() < deadline
            time.sleep(0.1)


def write_run(folder, run_id, epochs_and_scores):
    for epoch, score in epochs_and_scores:
        mx.nd.save(str(folder / f"{run_id}-{epoch}.params"), {"w": mx.nd.full((2,), score)})
        record = {"params_path": f"{run_id}-{epoch}.params", "epoch_no": epoch, "score": score, "run_id": run_id}
        (folder / f"{run_id}-{epoch}-epoch-info.json").write_text(json.dumps(record))


def test_modavg_average_on_a_folder_of_two_runs_says_so_and_averages_the_one_chosen(tmp_path, capsys):
    write_run(tmp_path, "aaaa", [(0, 1.0), (1, 2.0)])
    write_run(tmp_path, "bbbb", [(0, 5.0), (1, 7.0), (2, 9.0)])
    assert main(["average", str(tmp_path), "-o", str(tmp_path / "out.params")]) == 1
    error = capsys.readouterr().err
    assert "holds the records of 2 runs (aaaa: 2 records, 0-1; bbbb: 3 records, 0-2)" in error and "--run ID" in error
    assert main(["average", str(tmp_path), "--run", "bbbb", "-o", str(tmp_path / "out.params")]) == 0
    assert_allclose(mx.nd.load(str(tmp_path / "out.params"))["w"].asnumpy(), [7.0, 7.0])


# Bad input: one clear line, a skipped record, nothing half-changed ----------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("epochs_done", -1, "'epochs_done' is not an integer >= 0"),
        ("num_updates", "12", "'num_updates' is not an integer >= 0"),
        ("history", {"a": 1}, "'history' is not a list of objects"),
        ("records", "everything", "'records' is not a list"),
        ("run_id", ["x"], "'run_id' is not a short string"),
        ("num_applied", -3, "moving-average state 'num_applied' must be an integer >= 0"),
    ],
)
def test_hostile_fields_in_a_state_file_are_one_error_naming_the_file(tmp_path, field, value, message):
    run = AveragingRun(checkpoint_dir=str(tmp_path))
    pairs = parameters()
    run.start(pairs)
    epochs(run, pairs, 1)
    run = None
    gc.collect()  # killed: the files stay, the lock goes with the process
    state, arrays, _ = read_state_file(str(tmp_path / STATE_NAME))
    save_state_file(str(tmp_path / STATE_NAME), {**state, field: value}, arrays, blobs={})
    resumed = AveragingRun(checkpoint_dir=str(tmp_path), resume=True)
    with pytest.raises(CheckpointError, match=f"cannot resume from {tmp_path / STATE_NAME}: .*{message}"):
        resumed.resume()
        resumed.start(pairs)


def test_load_state_dict_checks_everything_before_changing_anything():
    pairs = parameters()
    ema = ExponentialMovingAverage(pairs, decay=0.5)
    before = {name: shadow.asnumpy().copy() for name, shadow in ema.shadows.items()}
    state = ema.state_dict()
    state["shadows"]["w"] = np.ones((3, 2)) * 9  # a good one...
    state["shadows"]["b"] = np.ones(4)  # ...and a bad one, checked after it
    with pytest.raises(ValueError, match="'b' has shape"):
        ema.load_state_dict(state)
    for name, shadow in ema.shadows.items():
        assert_array_equal(shadow.asnumpy(), before[name])
    assert ema.num_applied == 0


def empty_entry_file(path, values):
    """A .params file holding an empty NDArray entry (what MXNet writes for an array with no shape) and a real one."""
    body = struct.pack("<QQQ", 0x112, 0, 2)
    body += struct.pack("<Iii", 0xF993FAC9, 0, 0)
    body += struct.pack("<Iii", 0xF993FAC9, 0, 1) + struct.pack("<q", 2) + struct.pack("<iii", 1, 0, 0)
    body += struct.pack("<2f", *values)
    body += struct.pack("<Q", 2) + b"".join(struct.pack("<Q", 2) + name for name in (b"e0", b"w0"))
    path.write_bytes(body)
    return str(path)


def test_an_empty_array_entry_and_an_empty_output_name_are_one_line_errors(tmp_path, capsys):
    first, second = empty_entry_file(tmp_path / "a.params", (1, 2)), empty_entry_file(tmp_path / "b.params", (3, 4))
    assert main(["average", first, second, "-o", str(tmp_path / "o.params")]) == 1
    error = capsys.readouterr().err
    assert (
        error.startswith(f"modavg: error: checkpoint file {first} is not a readable .params file")
        and "Traceback" not in error
    )
    mx.nd.save(str(tmp_path / "c.params"), {"w": mx.nd.ones(2)})
    assert main(["average", str(tmp_path / "c.params"), str(tmp_path / "c.params"), "-o", ""]) == 1
    assert capsys.readouterr().err == "modavg: error: the output is an empty name; give a file name with -o OUT\n"
