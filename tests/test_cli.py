"""The ``modavg`` command: both checkpoint formats, both forms, and one clear line for every bad input.

Expected averages are NumPy means of the arrays the tests saved; most tests
call ``main`` in-process, two run the real command in a subprocess.
"""

import os
import pathlib
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
import pytest
import scipy.special
from numpy.testing import assert_allclose

from modavg_plugin import AveragingStrategy, save_epoch_info
from modavg_plugin.cli import main
from modavg_plugin.strategies import AVERAGED_MODEL_NAME

Arrays = Dict[str, np.ndarray]
SCORES = [6.0, 1.0, 5.0, 2.0, 4.0, 3.0]  # best by score (lowest): epochs 1, 3, 5, 4, 2, 0
ACCURACIES = [0.8, 0.9, 0.3, 0.1, 0.2, 0.5]  # best by accuracy (highest): epochs 1, 0, 5, 2, 4, 3
PROJECT = pathlib.Path(__file__).parent.parent


def save_gluon(path: pathlib.Path, arrays: Arrays) -> str:
    mx.nd.save(str(path), {name: mx.nd.array(value, dtype=value.dtype) for name, value in arrays.items()})
    return str(path)


def random_arrays(seed: int, shapes: Optional[Dict[str, Tuple[int, ...]]] = None) -> Arrays:
    rng = np.random.default_rng(seed)
    shapes = shapes or {"dense0_weight": (3, 4), "dense0_bias": (3,)}
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


def weighted_mean(arrays: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return {
        name: sum(weight * values[name].astype(np.float64) for weight, values in zip(weights, arrays))
        for name in arrays[0]
    }


def assert_params_file_equals(path: str, expected: Arrays) -> None:
    loaded = mx.nd.load(path)
    assert sorted(loaded) == sorted(expected)
    for name, value in expected.items():
        assert_allclose(loaded[name].asnumpy(), value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.fixture
def folder(tmp_path) -> Tuple[pathlib.Path, List[Arrays]]:
    """Six Gluon checkpoints with epoch info (``score`` and ``accuracy``) and their arrays."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    arrays = []
    for epoch, (score, accuracy) in enumerate(zip(SCORES, ACCURACIES)):
        arrays.append(random_arrays(epoch))
        save_gluon(checkpoints / f"epoch-{epoch:04d}.params", arrays[-1])
        info = {"params_path": f"epoch-{epoch:04d}.params", "epoch_no": epoch, "score": score, "accuracy": accuracy}
        save_epoch_info(str(checkpoints / f"epoch-{epoch:04d}"), info)
    return checkpoints, arrays


def module_checkpoints(folder: pathlib.Path, count: int) -> Tuple[str, List[Tuple[Arrays, Arrays]]]:
    """``count`` checkpoints of a FullyConnected + BatchNorm Module, by ``Module.save_checkpoint``."""
    symbol = mx.sym.BatchNorm(mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=3, name="fc"), name="bn")
    module = mx.mod.Module(symbol, data_names=["data"], label_names=None, context=mx.cpu())
    module.bind(data_shapes=[("data", (2, 4))], for_training=False)
    module.init_params()
    rng = np.random.default_rng(0)
    saved = []
    for epoch in range(1, count + 1):
        arg_params, aux_params = module.get_params()
        arg = {name: rng.normal(size=value.shape).astype(np.float32) for name, value in arg_params.items()}
        aux = {name: rng.uniform(0.5, 2.0, size=value.shape).astype(np.float32) for name, value in aux_params.items()}
        module.set_params(
            {name: mx.nd.array(value) for name, value in arg.items()},
            {name: mx.nd.array(value) for name, value in aux.items()},
        )
        module.save_checkpoint(str(folder / "net"), epoch)
        saved.append((arg, aux))
    return str(folder / "net"), saved


def run(capsys, argv: Sequence[str]) -> Tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_fails(capsys, argv: Sequence[str], *fragments: str, code: int = 1) -> str:
    """``main(argv)`` exits ``code`` with one ``modavg: error:`` line containing ``fragments``."""
    exit_code, out, err = run(capsys, argv)
    assert exit_code == code, err
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("modavg: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert "Traceback" not in err
    return err


def parse_dry_run(out: str) -> Tuple[str, List[Tuple[float, str]]]:
    header, *lines = out.splitlines()
    assert header.startswith("would average") and header.endswith("(dry run, nothing written):")
    output = header.split(" into ")[1].split(" (dry run")[0]
    return output, [(float(line.split()[0]), line.split(maxsplit=1)[1]) for line in lines]


# FILE mode


def test_files_equal_weight_mean_of_gluon_params(tmp_path, capsys):
    arrays = [random_arrays(seed) for seed in range(3)]
    paths = [save_gluon(tmp_path / f"model{index}.params", value) for index, value in enumerate(arrays)]
    output = str(tmp_path / "mean.params")
    assert run(capsys, ["average", *paths, "-o", output]) == (0, f"{output}\n", "")
    assert_params_file_equals(output, weighted_mean(arrays, [1, 1, 1]))


def test_files_module_checkpoints_keep_arg_aux_names_and_load_with_mxnet(tmp_path, capsys):
    prefix, saved = module_checkpoints(tmp_path, count=3)
    paths = [f"{prefix}-{epoch:04d}.params" for epoch in (1, 2, 3)]
    output = str(tmp_path / "averaged-0000.params")
    assert run(capsys, ["average", *paths, "-o", output])[0] == 0
    expected = {f"arg:{name}": value for name, value in weighted_mean([arg for arg, _ in saved], [1, 1, 1]).items()}
    expected.update({f"aux:{name}": value for name, value in weighted_mean([aux for _, aux in saved], [1] * 3).items()})
    assert sorted(expected) == sorted(mx.nd.load(paths[0]))  # the same names as the inputs
    assert {"aux:bn_moving_mean", "aux:bn_moving_var", "arg:fc_weight"} <= set(expected)
    assert_params_file_equals(output, expected)
    shutil.copy(f"{prefix}-symbol.json", tmp_path / "averaged-symbol.json")
    _, arg_params, aux_params = mx.model.load_checkpoint(str(tmp_path / "averaged"), 0)
    assert_allclose(arg_params["fc_weight"].asnumpy(), expected["arg:fc_weight"], rtol=1e-5)
    assert_allclose(aux_params["bn_moving_var"].asnumpy(), expected["aux:bn_moving_var"], rtol=1e-5)


def test_files_dry_run_lists_files_and_weights_and_writes_nothing(tmp_path, capsys):
    paths = [save_gluon(tmp_path / f"model{index}.params", random_arrays(index)) for index in range(2)]
    before = sorted(os.listdir(tmp_path))
    code, out, err = run(capsys, ["average", *paths, "-o", str(tmp_path / "mean.params"), "--dry-run"])
    assert code == 0 and err == ""
    assert parse_dry_run(out) == (str(tmp_path / "mean.params"), [(0.5, paths[0]), (0.5, paths[1])])
    assert sorted(os.listdir(tmp_path)) == before


# FOLDER mode


def test_folder_default_is_mean_of_five_best_written_inside_the_folder(folder, capsys):
    checkpoints, arrays = folder
    expected_output = str(checkpoints / AVERAGED_MODEL_NAME)
    assert run(capsys, ["average", str(checkpoints)]) == (0, f"{expected_output}\n", "")
    assert_params_file_equals(expected_output, weighted_mean([arrays[epoch] for epoch in (1, 3, 5, 4, 2)], [1] * 5))


def test_folder_num_models_and_output(folder, tmp_path, capsys):
    checkpoints, arrays = folder
    output = str(tmp_path / "best2.params")
    assert run(capsys, ["average", str(checkpoints), "--num-models", "2", "-o", output])[:2] == (0, f"{output}\n")
    assert_params_file_equals(output, weighted_mean([arrays[1], arrays[3]], [1, 1]))
    assert not (checkpoints / AVERAGED_MODEL_NAME).exists()


def test_folder_softmax_weights_the_best_by_their_scores(folder, capsys):
    checkpoints, arrays = folder
    assert run(capsys, ["average", str(checkpoints), "--strategy", "softmax", "--num-models", "3"])[0] == 0
    weights = scipy.special.softmax(-np.array([SCORES[1], SCORES[3], SCORES[5]]))  # [0.665, 0.245, 0.090]
    expected = weighted_mean([arrays[1], arrays[3], arrays[5]], weights)
    assert_params_file_equals(str(checkpoints / AVERAGED_MODEL_NAME), expected)
    plain_mean = weighted_mean([arrays[1], arrays[3], arrays[5]], [1, 1, 1])
    assert not np.allclose(expected["dense0_weight"], plain_mean["dense0_weight"], rtol=1e-3)


@pytest.mark.parametrize(
    "options, epochs",
    [
        (["--metric", "accuracy", "--maximize"], [1, 0, 5]),  # highest accuracy
        (["--metric", "accuracy"], [3, 4, 2]),  # lowest accuracy (a loss-like metric)
        (["--maximize"], [0, 2, 4]),  # highest score
    ],
)
def test_folder_metric_and_maximize_choose_the_checkpoints(folder, capsys, options, epochs):
    checkpoints, arrays = folder
    code, out, _ = run(capsys, ["average", str(checkpoints), "--num-models", "3", *options, "--dry-run"])
    assert code == 0
    output, listed = parse_dry_run(out)
    assert output == str(checkpoints / AVERAGED_MODEL_NAME) and not os.path.exists(output)
    paths = [str(checkpoints / f"epoch-{epoch:04d}.params") for epoch in epochs]
    assert listed == [(pytest.approx(1 / 3, rel=1e-5), path) for path in paths]
    assert run(capsys, ["average", str(checkpoints), "--num-models", "3", *options])[0] == 0
    assert_params_file_equals(output, weighted_mean([arrays[epoch] for epoch in epochs], [1, 1, 1]))


def test_folder_dry_run_shows_softmax_weights_and_writes_nothing(folder, capsys):
    checkpoints, _ = folder
    before = sorted(os.listdir(checkpoints))
    argv = ["average", str(checkpoints), "--strategy", "softmax", "--num-models", "2", "--dry-run"]
    code, out, _ = run(capsys, argv)
    assert code == 0
    weights = scipy.special.softmax(-np.array([SCORES[1], SCORES[3]]))
    paths = [str(checkpoints / f"epoch-{epoch:04d}.params") for epoch in (1, 3)]
    expected = [(pytest.approx(weight, rel=1e-5), path) for weight, path in zip(weights, paths)]
    assert parse_dry_run(out) == (str(checkpoints / AVERAGED_MODEL_NAME), expected)
    assert sorted(os.listdir(checkpoints)) == before


def test_folder_of_module_checkpoints(tmp_path, capsys):
    prefix, saved = module_checkpoints(tmp_path, count=3)
    for epoch, score in zip((1, 2, 3), (0.3, 0.1, 0.2)):
        info = {"params_path": f"net-{epoch:04d}.params", "epoch_no": epoch, "score": score}
        save_epoch_info(f"{prefix}-{epoch:04d}", info)
    assert run(capsys, ["average", str(tmp_path), "--num-models", "2"])[0] == 0
    expected = weighted_mean([saved[1][1], saved[2][1]], [1, 1])  # aux of epochs 2 and 3
    averaged = mx.nd.load(str(tmp_path / AVERAGED_MODEL_NAME))
    assert_allclose(averaged["aux:bn_moving_mean"].asnumpy(), expected["bn_moving_mean"], rtol=1e-5)


def test_folder_skips_a_truncated_checkpoint_with_one_warning_line_and_selects_the_next_best(folder, capsys):
    checkpoints, arrays = folder
    truncated = checkpoints / "epoch-0003.params"
    truncated.write_bytes(truncated.read_bytes()[:60])
    code, out, err = run(capsys, ["average", str(checkpoints), "--num-models", "3"])
    assert code == 0 and out == f"{checkpoints / AVERAGED_MODEL_NAME}\n"
    assert len(err.splitlines()) == 1 and err.startswith("modavg: warning: skipping 1 of the epoch-info files in ")
    assert f"{checkpoints}: epoch-0003-epoch-info.json" in err and str(truncated) in err and "truncated" in err
    # the 3 best usable: epochs 1, 5, 4 (scores 1, 3, 4); epoch 3 (score 2) is out
    expected = weighted_mean([arrays[1], arrays[5], arrays[4]], [1, 1, 1])
    assert_params_file_equals(str(checkpoints / AVERAGED_MODEL_NAME), expected)


def test_folder_ignores_leftovers_of_interrupted_writes_with_one_warning_line(folder, capsys):
    checkpoints, arrays = folder
    (checkpoints / ".tmp-k3j2-epoch-0006.params").write_bytes(b"\x12\x01\x00")  # killed while writing
    (checkpoints / ".tmp-x8q1-epoch-0006-epoch-info.json").write_text(
        '{"params_path": "epoch-0001.params", "score": 0}'
    )
    code, out, err = run(capsys, ["average", str(checkpoints), "--num-models", "2"])
    assert code == 0 and out == f"{checkpoints / AVERAGED_MODEL_NAME}\n"
    assert len(err.splitlines()) == 1 and err.startswith("modavg: warning: ignoring 2 temporary file(s) in ")
    assert ".tmp-k3j2-epoch-0006.params" in err and ".tmp-x8q1-epoch-0006-epoch-info.json" in err
    assert_params_file_equals(str(checkpoints / AVERAGED_MODEL_NAME), weighted_mean([arrays[1], arrays[3]], [1, 1]))


def test_folder_params_path_outside_the_folder_needs_allow_outside_folder(tmp_path, capsys):
    elsewhere, checkpoints = tmp_path / "elsewhere", tmp_path / "checkpoints"
    elsewhere.mkdir()
    checkpoints.mkdir()
    arrays = [random_arrays(seed) for seed in range(2)]
    save_gluon(elsewhere / "epoch-0000.params", arrays[0])
    save_gluon(checkpoints / "epoch-0001.params", arrays[1])
    save_epoch_info(str(checkpoints / "epoch-0000"), {"params_path": "../elsewhere/epoch-0000.params", "score": 1.0})
    save_epoch_info(str(checkpoints / "epoch-0001"), {"params_path": "epoch-0001.params", "score": 2.0})
    code, _, err = run(capsys, ["average", str(checkpoints), "--num-models", "2"])
    assert code == 0 and len(err.splitlines()) == 1
    assert "epoch-0000-epoch-info.json" in err and "outside the folder" in err and "--allow-outside-folder" in err
    assert_params_file_equals(str(checkpoints / AVERAGED_MODEL_NAME), arrays[1])
    code, _, err = run(capsys, ["average", str(checkpoints), "--num-models", "2", "--allow-outside-folder"])
    assert code == 0 and err == ""
    assert_params_file_equals(str(checkpoints / AVERAGED_MODEL_NAME), weighted_mean(arrays, [1, 1]))


# bad inputs: exit non-zero, one line naming the culprit, nothing written


def test_mixed_formats_among_files(tmp_path, capsys):
    prefix, _ = module_checkpoints(tmp_path, count=1)
    gluon = save_gluon(tmp_path / "gluon.params", {"fc_weight": np.ones((3, 4), np.float32)})
    output = tmp_path / "out.params"
    argv = ["average", gluon, f"{prefix}-0001.params", "-o", str(output)]
    assert_fails(capsys, argv, "mixed checkpoint formats", f"{prefix}-0001.params", "arg:/aux:")
    assert not output.exists()


def test_mixed_formats_in_a_folder(folder, tmp_path, capsys):
    checkpoints, _ = folder
    save_gluon(checkpoints / "epoch-0003.params", {"arg:dense0_weight": np.ones((3, 4), np.float32)})
    assert_fails(capsys, ["average", str(checkpoints)], "mixed checkpoint formats", "epoch-0003.params")
    assert not (checkpoints / AVERAGED_MODEL_NAME).exists()


def test_missing_file(tmp_path, capsys):
    present = save_gluon(tmp_path / "a.params", random_arrays(0))
    argv = ["average", present, str(tmp_path / "b.params"), "-o", str(tmp_path / "out.params")]
    assert_fails(capsys, argv, f"{tmp_path / 'b.params'} does not exist")


def test_empty_folder(tmp_path, capsys):
    assert_fails(capsys, ["average", str(tmp_path)], "no checkpoints", str(tmp_path))


def test_mismatched_keys(tmp_path, capsys):
    first = save_gluon(tmp_path / "a.params", random_arrays(0))
    second = save_gluon(tmp_path / "b.params", {**random_arrays(1), "dense1_bias": np.zeros(2, np.float32)})
    assert_fails(capsys, ["average", first, second, "-o", str(tmp_path / "out.params")], "'dense1_bias'", "b.params")


def test_mismatched_shapes(tmp_path, capsys):
    first = save_gluon(tmp_path / "a.params", random_arrays(0))
    second = save_gluon(tmp_path / "b.params", random_arrays(1, {"dense0_weight": (3, 5), "dense0_bias": (3,)}))
    output = tmp_path / "out.params"
    assert_fails(capsys, ["average", first, second, "-o", str(output)], "'dense0_weight'", "(3, 5)", "b.params")
    assert not output.exists()


def test_unknown_strategy_suggests_the_closest(folder, capsys):
    checkpoints, _ = folder
    argv = ["average", str(checkpoints), "--strategy", "softmaks"]
    assert_fails(capsys, argv, "'softmaks'", "did you mean 'softmax'")


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_num_models_below_one(folder, capsys, value):
    checkpoints, _ = folder
    assert_fails(capsys, ["average", str(checkpoints), "--num-models", value], "--num-models", ">= 1", code=2)


def test_truncated_file_among_named_files_is_an_error(tmp_path, capsys):
    paths = [save_gluon(tmp_path / f"model{index}.params", random_arrays(index)) for index in range(3)]
    pathlib.Path(paths[1]).write_bytes(pathlib.Path(paths[1]).read_bytes()[:-7])
    output = tmp_path / "out.params"
    assert_fails(capsys, ["average", *paths, "-o", str(output)], paths[1], "truncated")
    assert not output.exists()


def test_every_epoch_info_unusable_is_one_error_listing_each_reason(folder, capsys):
    checkpoints, _ = folder
    for epoch in range(len(SCORES)):
        (checkpoints / f"epoch-{epoch:04d}.params").write_text("not a params file")
    (checkpoints / "epoch-0002-epoch-info.json").write_text("[1, 2]")
    err = assert_fails(capsys, ["average", str(checkpoints)], f"no usable checkpoint in folder {checkpoints}")
    for epoch in range(len(SCORES)):
        assert f"epoch-{epoch:04d}-epoch-info.json: " in err
    assert "epoch-0002-epoch-info.json: not a JSON object (a list)" in err
    assert f"checkpoint file {checkpoints / 'epoch-0001.params'} is not a readable .params file" in err


def test_selected_checkpoints_unreadable_after_selection(folder, capsys, monkeypatch):
    """Files that turn unreadable between reading the records and averaging are skipped; none left is an error."""
    checkpoints, _ = folder
    read_records = AveragingStrategy.get_checkpoint_information

    def read_then_break(model_path, allow_outside_folder=False, run=None):
        records = read_records(model_path, allow_outside_folder=allow_outside_folder, run=run)
        for epoch in (1, 3):
            (checkpoints / f"epoch-{epoch:04d}.params").write_text("not a params file")
        return records

    monkeypatch.setattr(AveragingStrategy, "get_checkpoint_information", staticmethod(read_then_break))
    code, out, err = run(capsys, ["average", str(checkpoints), "--num-models", "2"])
    assert code == 1 and out == ""
    warnings, error = err.splitlines()[:-1], err.splitlines()[-1]
    assert len(warnings) == 2 and all(line.startswith("modavg: warning: skipping") for line in warnings)
    assert error.startswith("modavg: error: none of the 2 selected checkpoints") and "Traceback" not in err


def test_missing_metric(folder, capsys):
    checkpoints, _ = folder
    assert_fails(capsys, ["average", str(checkpoints), "--metric", "bleu"], "'bleu'", "epoch-info")


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (["a.params"], "-o/--output is required"),
        (["a.params", ".", "-o", "out.params"], ". is a folder: give either .params files or one folder"),
        (["a.params", "-o", "out.params", "--strategy", "mean"], "--strategy applies only when averaging a folder"),
        (["a.params", "-o", "out.params", "--maximize"], "--maximize applies only when averaging a folder"),
        (
            ["a.params", "-o", "out.params", "--allow-outside-folder"],
            "--allow-outside-folder applies only when averaging a folder",
        ),
    ],
)
def test_file_mode_usage_errors(tmp_path, capsys, monkeypatch, arguments, fragment):
    monkeypatch.chdir(tmp_path)
    save_gluon(tmp_path / "a.params", random_arrays(0))
    assert_fails(capsys, ["average", *arguments], fragment, code=2)


def test_output_must_not_overwrite_an_input_or_go_to_a_missing_folder(folder, capsys):
    checkpoints, _ = folder
    input_path, missing_folder = checkpoints / "epoch-0001.params", checkpoints / "no" / "out.params"
    assert_fails(capsys, ["average", str(checkpoints), "-o", str(input_path)], "is one of the checkpoints")
    assert_fails(capsys, ["average", str(checkpoints), "-o", str(missing_folder)], "does not exist")


# the real command


def run_command(command: List[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_python_dash_m_reports_a_missing_file_in_one_line(tmp_path):
    command = [sys.executable, "-m", "modavg_plugin", "average", "gone.params", "-o", "out.params"]
    result = run_command(command, tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "modavg: error: checkpoint file gone.params does not exist\n"


def test_console_script_reports_mixed_formats_in_one_line(tmp_path):
    script = pathlib.Path(sys.executable).parent / "modavg"
    assert script.exists(), "install the package (pip install -e .) to get the modavg script"
    save_gluon(tmp_path / "gluon.params", {"w": np.ones(2, np.float32)})
    save_gluon(tmp_path / "module.params", {"arg:w": np.ones(2, np.float32)})
    result = run_command([str(script), "average", "gluon.params", "module.params", "-o", "out.params"], tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("modavg: error: mixed checkpoint formats: module.params has Module names")


def test_importing_the_command_does_not_import_gluonts():
    code = "import sys, modavg_plugin.cli; print(sorted(name for name in sys.modules if name.startswith('gluonts')))"
    result = run_command([sys.executable, "-c", code], PROJECT)
    assert result.returncode == 0 and result.stdout == "[]\n", result.stderr


def test_help_exits_zero(capsys):
    assert main(["average", "--help"]) == 0
    assert "--num-models" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [[], ["--num-models", "3"], ["-o", "out.params"]])
def test_a_missing_folder_is_reported_as_missing_whatever_the_options(tmp_path, capsys, extra):
    missing = str(tmp_path / "no-such-run") + "/"
    assert main(["average", missing, *extra]) == 1
    assert capsys.readouterr().err.strip() == f"modavg: error: checkpoint folder {missing} does not exist"
