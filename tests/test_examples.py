"""The examples run as written (tiny settings), so they cannot rot."""

import importlib.util
import math
import pathlib

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gluonts_demo_quick(capsys):
    outcome = load_example("gluonts_co2").main(["--quick", "--seeds", "0"])
    results = outcome["results"][0]
    assert set(results) == {"last iterate", "EMA (decay 0.999)"}
    for metrics in results.values():
        assert math.isfinite(metrics["MASE"]) and math.isfinite(metrics["mean_wQuantileLoss"])
    assert results["last iterate"]["MASE"] != results["EMA (decay 0.999)"]["MASE"]
    printed = capsys.readouterr().out
    assert "statsmodels co2" in printed and "EMA (decay 0.999)" in printed


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
