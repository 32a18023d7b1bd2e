"""The examples run as written (tiny settings), so they cannot rot."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import matplotlib.image

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_forecasting_demo_quick_runs_as_make_demo_does(tmp_path):
    """The script as ``make demo`` runs it (two worker processes), in its tiny setting, on two seeds."""
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "forecasting_demo.py"), "--quick", "--seeds", "0", "1", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": ""},  # conftest silences progress bars; this test looks for one
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    methods = ["last iterate", "EMA", "EMA + best-5 mean", "checkpoint mean"]
    assert {(run["dataset"], run["method"], run["seed"]) for run in results["runs"]} == {
        (dataset, method, seed) for dataset in ("co2", "macrodata") for method in methods for seed in (0, 1)
    }
    for dataset in ("co2", "macrodata"):
        assert list(results["summary"][dataset]) == methods
        runs = {(run["method"], run["seed"]): run for run in results["runs"] if run["dataset"] == dataset}
        for method in methods:
            for metric in ("MASE", "sMAPE", "mean_wQuantileLoss"):
                values = [runs[(method, seed)][metric] for seed in (0, 1)]
                assert all(math.isfinite(value) for value in values)
                assert math.isclose(results["summary"][dataset][method][metric]["mean"], (values[0] + values[1]) / 2)
                assert math.isclose(results["summary"][dataset][method][metric]["std"], abs(values[0] - values[1]) / math.sqrt(2))
            lower = sum(runs[(method, seed)]["MASE"] < runs[("last iterate", seed)]["MASE"] for seed in (0, 1))
            assert results["summary"][dataset][method]["seeds_with_lower_MASE"] == lower
        for seed in (0, 1):
            history = runs[("EMA", seed)]["history"]
            assert [entry["epoch_no"] for entry in history] == [0, 1]
            assert all(entry["validation_loss"] != entry["raw_validation_loss"] for entry in history)
    assert "statsmodels co2" in completed.stdout and "statsmodels macrodata" in completed.stdout
    assert "training runs" in completed.stderr  # the progress bar
    for name in ("validation_loss.png", "forecast_fan.png"):
        height, width, _ = matplotlib.image.imread(tmp_path / name).shape
        assert (width, height) == (1200, 400), name


def test_gluon_loop_quick(capsys):
    outcome = load_example("gluon_loop").main(["--quick"])
    errors = outcome["held_out_mse"]
    assert all(math.isfinite(error) for error in errors.values())
    assert errors["last iterate"] != errors["EMA (decay 0.99)"]
    assert "held-out MSE" in capsys.readouterr().out


def test_module_example_quick(capsys):
    outcome = load_example("module_digits").main(["--quick"])
    results = outcome["results"][0]
    assert list(results) == ["last iterate", "EMA (decay 0.99)", "mean of 3 best epoch EMAs"]
    assert all(0.0 <= accuracy <= 1.0 for accuracy in results.values())
    assert "scikit-learn digits" in capsys.readouterr().out
