import copy
import logging
import math
import os
import pickle

import mxnet as mx
import numpy as np
import pytest
import scipy.special
from numpy.testing import assert_allclose, assert_array_equal

from modavg_plugin import (
    AveragingStrategy,
    CheckpointError,
    ConfigurationError,
    GreedySoup,
    SelectNBestMean,
    SelectNBestSoftmax,
    save_epoch_info,
)
from modavg_plugin.cli import main
from modavg_plugin.params_files import load_params


def write_checkpoint(folder, epoch_no: int, score, arrays: dict) -> str:
    base = os.path.join(str(folder), f"epoch-{epoch_no:04d}")
    arrays = {name: np.asarray(value, dtype=getattr(value, "dtype", np.float32)) for name, value in arrays.items()}
    mx.nd.save(f"{base}.params", {name: mx.nd.array(value, dtype=value.dtype) for name, value in arrays.items()})
    save_epoch_info(base, {"params_path": f"{base}.params", "epoch_no": epoch_no, "score": score})
    return f"{base}.params"


def records(scores):
    return [{"params_path": f"p{index}", "epoch_no": index, "score": score} for index, score in enumerate(scores)]


def test_mean_selects_n_best_lowest_first_with_equal_weights():
    paths, weights = SelectNBestMean(num_models=2).select_checkpoints(records([0.5, 0.1, 0.3]))
    assert paths == ["p1", "p2"] and weights == [0.5, 0.5]


def test_maximize_selects_highest():
    strategy = SelectNBestMean(num_models=2, maximize=True)
    assert strategy.select_checkpoints(records([0.5, 0.1, 0.3]))[0] == ["p0", "p2"]


def test_num_models_larger_than_available_uses_all():
    paths, weights = SelectNBestMean(num_models=10).select_checkpoints(records([3.0, 1.0]))
    assert paths == ["p1", "p0"] and weights == [0.5, 0.5]


@pytest.mark.parametrize("scores", [[800.0, 900.0, 1000.0], [0.010, 0.012, 0.3], [-1e6, 0.0, 1e6]])
@pytest.mark.parametrize("maximize", [False, True])
def test_softmax_weights_are_stable_and_match_scipy(scores, maximize):
    strategy = SelectNBestSoftmax(num_models=3, maximize=maximize)
    paths, weights = strategy.select_checkpoints(records(scores))
    chosen = [scores[int(path[1:])] for path in paths]
    expected = scipy.special.softmax(np.array(chosen) * (1 if maximize else -1))
    assert all(math.isfinite(weight) for weight in weights)
    assert_allclose(weights, expected, rtol=1e-12, atol=1e-300)
    assert sum(weights) == pytest.approx(1.0)


def test_softmax_where_gluonts_gives_nan():
    """GluonTS computes exp(-800) / sum: 0/0. Here the best of [800, 900, 1000] gets all the weight."""
    _, weights = SelectNBestSoftmax(num_models=3).select_checkpoints(records([800.0, 900.0, 1000.0]))
    assert weights[0] == pytest.approx(1.0) and weights[1] == pytest.approx(math.exp(-100))


@pytest.mark.parametrize("strategy_type", [SelectNBestMean, SelectNBestSoftmax])
def test_nan_and_infinite_scores_are_never_selected(strategy_type):
    paths, _ = strategy_type(num_models=5).select_checkpoints(records([math.nan, 2.0, math.inf, 1.0, -math.inf]))
    assert paths == ["p3", "p1"]


def test_all_nan_scores_is_an_error():
    with pytest.raises(CheckpointError, match="no checkpoint has a finite 'score'"):
        SelectNBestMean().select_checkpoints(records([math.nan, math.nan]))


def test_missing_metric_is_named():
    with pytest.raises(CheckpointError, match="metric 'accuracy' is missing"):
        SelectNBestMean(metric="accuracy").select_checkpoints(records([1.0]))


@pytest.mark.parametrize("num_models", [0, -1, 1.5, True])
def test_bad_num_models_is_refused(num_models):
    with pytest.raises(ConfigurationError, match="num_models must be an integer >= 1"):
        SelectNBestMean(num_models=num_models)


def test_from_config_and_serde_round_trip():
    from gluonts.core import serde

    strategy = AveragingStrategy.from_config({"type": "softmax", "num_models": 3, "maximize": True})
    assert isinstance(strategy, SelectNBestSoftmax)
    assert serde.decode(serde.encode(strategy)) == strategy


def test_average_arrays_weighted_mean():
    arrays = [mx.nd.array([1.0, 2.0]), mx.nd.array([3.0, 6.0])]
    assert_allclose(AveragingStrategy.average_arrays(arrays, [0.25, 0.75]).asnumpy(), [2.5, 5.0])
    with pytest.raises(ValueError, match="arrays is empty"):
        AveragingStrategy.average_arrays([], [])
    with pytest.raises(ValueError, match="same shape"):
        AveragingStrategy.average_arrays([mx.nd.ones(2), mx.nd.ones(3)], [0.5, 0.5])
    with pytest.raises(ValueError, match="2 weights for 1 items"):
        AveragingStrategy.average_arrays([mx.nd.ones(2)], [0.5, 0.5])


def test_apply_averages_the_best_checkpoints_of_a_folder(tmp_path):
    write_checkpoint(tmp_path, 0, 3.0, {"w": [[0.0, 0.0]], "steps": np.array([1], dtype=np.int32)})
    write_checkpoint(tmp_path, 1, 1.0, {"w": [[2.0, 4.0]], "steps": np.array([2], dtype=np.int32)})
    write_checkpoint(tmp_path, 2, 2.0, {"w": [[4.0, 8.0]], "steps": np.array([3], dtype=np.int32)})
    path = SelectNBestMean(num_models=2).apply(str(tmp_path))
    assert path == os.path.join(str(tmp_path), "averaged_model-0000.params")
    averaged = load_params(path)
    assert_allclose(averaged["w"].asnumpy(), [[3.0, 6.0]])
    assert_array_equal(averaged["steps"].asnumpy(), [2])  # integers: copied from the best checkpoint
    assert averaged["steps"].dtype == np.int32


def test_softmax_apply_matches_independent_weighting(tmp_path):
    write_checkpoint(tmp_path, 0, 1.0, {"w": [10.0]})
    write_checkpoint(tmp_path, 1, 2.0, {"w": [20.0]})
    averaged = load_params(SelectNBestSoftmax(num_models=2).apply(str(tmp_path)))
    w0 = 1 / (1 + math.exp(-1.0))
    assert_allclose(averaged["w"].asnumpy(), [10.0 * w0 + 20.0 * (1 - w0)], rtol=1e-6)


def test_float16_checkpoints_are_summed_in_float32(tmp_path):
    """Seven checkpoints of 100.0 weighted 1/7: a float16 running sum gives 99.9, float32 gives 100."""
    paths = [write_checkpoint(tmp_path, index, 1.0, {"w": np.full(1, 100.0, dtype=np.float16)}) for index in range(7)]
    averaged = SelectNBestMean(num_models=7).average(paths, [1 / 7] * 7)["w"]
    assert averaged.dtype == np.float16
    assert averaged.asscalar() == 100.0


def test_empty_and_missing_folders_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"no checkpoints .* in folder {tmp_path}"):
        SelectNBestMean().apply(str(tmp_path))
    with pytest.raises(CheckpointError, match="folder .*nowhere does not exist"):
        SelectNBestMean().apply(str(tmp_path / "nowhere"))


def test_mismatched_keys_and_shapes_are_named(tmp_path):
    first = write_checkpoint(tmp_path, 0, 1.0, {"w": [1.0], "b": [0.0]})
    other_key = write_checkpoint(tmp_path, 1, 1.0, {"w": [1.0], "c": [0.0]})
    other_shape = write_checkpoint(tmp_path, 2, 1.0, {"w": [1.0, 2.0], "b": [0.0]})
    with pytest.raises(
        CheckpointError, match=r"parameter 'b' is in .*epoch-0000\.params but not in .*epoch-0001\.params"
    ):
        SelectNBestMean().average([first, other_key], [0.5, 0.5])
    with pytest.raises(CheckpointError, match=r"parameter 'w' has shape \(2,\) in .*epoch-0002.params"):
        SelectNBestMean().average([first, other_shape], [0.5, 0.5])


def test_truncated_file_is_skipped_with_a_warning_and_the_rest_averaged(tmp_path, caplog):
    write_checkpoint(tmp_path, 0, 1.0, {"w": [2.0]})
    write_checkpoint(tmp_path, 1, 2.0, {"w": [4.0]})
    broken = write_checkpoint(tmp_path, 2, 0.5, {"w": [100.0]})
    with open(broken, "r+b") as file:
        file.truncate(20)
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        averaged = load_params(SelectNBestMean(num_models=3).apply(str(tmp_path)))
    assert_allclose(averaged["w"].asnumpy(), [3.0])
    assert any("epoch-0002.params" in record.getMessage() for record in caplog.records)


def test_nothing_readable_is_an_error_naming_the_files(tmp_path):
    broken = write_checkpoint(tmp_path, 0, 1.0, {"w": [2.0]})
    open(broken, "wb").close()
    with pytest.raises(CheckpointError, match="no usable checkpoint.*epoch-0000.params"):
        SelectNBestMean().apply(str(tmp_path))


def test_unreadable_epoch_info_is_skipped(tmp_path, caplog):
    write_checkpoint(tmp_path, 0, 1.0, {"w": [2.0]})
    (tmp_path / "junk-epoch-info.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        records_read = SelectNBestMean.get_checkpoint_information(str(tmp_path))
    assert [record["epoch_no"] for record in records_read] == [0]
    assert any("junk-epoch-info.json" in record.getMessage() for record in caplog.records)


# hostile metric values


def test_metric_values_that_are_not_finite_numbers_are_excluded_with_one_warning(caplog):
    checkpoints = records([2.0, "0.1", True, None, math.nan, -math.inf, 10**400, 3, [0.5]])
    checkpoints.append({"params_path": "p9", "epoch_no": 9})  # no score at all
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        paths, weights = SelectNBestMean(num_models=5).select_checkpoints(checkpoints)
    assert paths == ["p0", "p7"] and weights == [0.5, 0.5]  # 2.0 and the integer 3
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning.startswith("not selecting 8 of 10 checkpoints: ")
    for reason in [
        "p1: 'score' is '0.1' (str), not a number",
        "p2: 'score' is True (bool), not a number",
        "p3: 'score' is None (NoneType), not a number",
        "p4: 'score' is nan (float), not finite",
        "p5: 'score' is -inf (float), not finite",
        "p6: 'score' is an integer of about 401 digits (int), not finite",
        "p8: 'score' is [0.5] (list), not a number",
        "p9: no 'score'",
    ]:
        assert reason in warning


def test_huge_finite_scores_are_ranked_as_they_are():
    """1e308 is a legal float: a very bad loss, or the best accuracy when maximising; weights stay finite."""
    scores = [1e308, -1e308, 0.5, 5e-324]
    assert SelectNBestMean(num_models=2).select_checkpoints(records(scores))[0] == ["p1", "p3"]
    paths, weights = SelectNBestSoftmax(num_models=4, maximize=True).select_checkpoints(records(scores))
    assert paths == ["p0", "p2", "p3", "p1"] and weights == [1.0, 0.0, 0.0, 0.0]


def test_only_unrankable_values_is_an_error_listing_them():
    with pytest.raises(
        CheckpointError, match=r"no checkpoint has a finite 'score': p0: 'score' is 'x' \(str\), not a number; p1"
    ):
        SelectNBestMean().select_checkpoints(records(["x", math.inf]))


def test_a_metric_missing_from_some_records_only_excludes_those(caplog):
    checkpoints = [{"params_path": "p0", "epoch_no": 0, "accuracy": 0.5}, {"params_path": "p1", "epoch_no": 1}]
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        assert SelectNBestMean(metric="accuracy").select_checkpoints(checkpoints) == (["p0"], [1.0])
    assert "not selecting 1 of 2 checkpoints: p1: no 'accuracy'" in caplog.text


# apply, end to end


def test_apply_selects_the_next_best_when_the_best_checkpoint_is_unreadable(tmp_path, caplog):
    write_checkpoint(tmp_path, 0, 3.0, {"w": [30.0]})
    write_checkpoint(tmp_path, 1, 1.0, {"w": [10.0]})
    broken = write_checkpoint(tmp_path, 2, 0.5, {"w": [1000.0]})
    write_checkpoint(tmp_path, 3, 2.0, {"w": [20.0]})
    open(broken, "wb").write(b"")
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        averaged = load_params(SelectNBestMean(num_models=2).apply(str(tmp_path)))
    assert_allclose(averaged["w"].asnumpy(), [15.0])  # epochs 1 and 3
    assert "epoch-0002-epoch-info.json" in caplog.text and "epoch-0002.params" in caplog.text


def test_apply_skips_a_checkpoint_holding_nan_values(tmp_path, caplog):
    write_checkpoint(tmp_path, 0, 1.0, {"w": [2.0, 2.0]})
    write_checkpoint(tmp_path, 1, 2.0, {"w": [4.0, 4.0]})
    diverged = write_checkpoint(tmp_path, 2, 0.5, {"w": [np.nan, 1.0]})
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        averaged = load_params(SelectNBestSoftmax(num_models=3).apply(str(tmp_path)))
    w1 = 1 / (1 + math.exp(-1.0))  # softmax of the losses 1 and 2, renormalised without the NaN checkpoint
    assert_allclose(averaged["w"].asnumpy(), [2.0 * w1 + 4.0 * (1 - w1)] * 2, rtol=1e-6)
    assert f"skipping checkpoint file {diverged}: it holds NaN or infinite values" in caplog.text


def test_apply_refuses_params_outside_the_folder_unless_allowed(tmp_path, caplog):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    write_checkpoint(run, 0, 2.0, {"w": [2.0]})
    outside = write_checkpoint(elsewhere, 1, 1.0, {"w": [4.0]})
    save_epoch_info(str(run / "epoch-0001"), {"params_path": outside, "epoch_no": 1, "score": 1.0})
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        assert_allclose(load_params(SelectNBestMean().apply(str(run)))["w"].asnumpy(), [2.0])
    assert "epoch-0001-epoch-info.json" in caplog.text and "outside the folder" in caplog.text
    averaged = load_params(SelectNBestMean().apply(str(run), allow_outside_folder=True))
    assert_allclose(averaged["w"].asnumpy(), [3.0])
    records_read = SelectNBestMean.get_checkpoint_information(str(run), allow_outside_folder=True)
    assert [record["params_path"] for record in records_read] == [str(run / "epoch-0000.params"), outside]


# greedy soup
#
# Five one-value checkpoints, tried in the order of their recorded scores (best
# first), with evaluate(arrays) = (w - 2)**2, a loss whose minimum is at w = 2:
#
#   tried  epoch  recorded  w  mean with it                evaluation                 soup after
#   1      1      0.1       0  0                           (0 - 2)**2 = 4             {0}, score 4
#   2      3      0.2       6  (0 + 6) / 2 = 3             1 < 4: kept                {0, 6}, score 1
#   3      2      0.3       9  (0 + 6 + 9) / 3 = 5         (5 - 2)**2 = 9: rejected   {0, 6}, score 1
#   4      4      0.4       0  (0 + 6 + 0) / 3 = 2         0 < 1: kept                {0, 6, 0}, score 0
#   5      0      0.5       2  (0 + 6 + 0 + 2) / 4 = 2     0, not < 0: rejected       {0, 6, 0}, score 0
#
# The soup: epochs 1, 3 and 4, weights 1/3 each, mean w = 2.

SOUP_CHECKPOINTS = [(0, 0.5, 2.0), (1, 0.1, 0.0), (2, 0.3, 9.0), (3, 0.2, 6.0), (4, 0.4, 0.0)]  # epoch, score, w
SOUP_EVALUATED_MEANS = [0.0, 3.0, 5.0, 2.0, 2.0]
SOUP_SCORES = [4.0, 1.0, 9.0, 0.0, 0.0]
SOUP_KEPT = [True, True, False, True, False]


def write_soup_folder(folder, recorded=lambda score: score, dtype=np.float32) -> dict:
    """The five checkpoints above, by epoch; ``steps`` (int32) holds the epoch number."""
    paths = {}
    for epoch, score, w in SOUP_CHECKPOINTS:
        arrays = {"w": np.array([w], dtype=dtype), "steps": np.array([epoch], dtype=np.int32)}
        paths[epoch] = write_checkpoint(folder, epoch, recorded(score), arrays)
    return paths


class DistanceToTarget:
    """``evaluate(arrays) = sign * (w - target)**2``, recording every ``arrays`` it is given (as NumPy)."""

    def __init__(self, sign: float = 1.0, target: float = 2.0) -> None:
        self.sign, self.target = sign, target
        self.calls = []

    def __call__(self, arrays) -> float:
        self.calls.append({name: array.asnumpy() for name, array in arrays.items()})
        return self.sign * (float(arrays["w"].asscalar()) - self.target) ** 2


def soup_order(paths: dict) -> list:
    return [paths[epoch] for epoch in (1, 3, 2, 4, 0)]


def select_from_folder(strategy, folder):
    return strategy.select_checkpoints(strategy.get_checkpoint_information(str(folder)))


def test_greedy_keeps_a_candidate_only_when_the_mean_with_it_evaluates_better(tmp_path, caplog):
    paths = write_soup_folder(tmp_path)
    evaluation = DistanceToTarget()
    strategy = GreedySoup(evaluate=evaluation)
    with caplog.at_level(logging.INFO, logger="modavg_plugin.strategies"):
        selected, weights = select_from_folder(strategy, tmp_path)
    assert selected == [paths[1], paths[3], paths[4]] and weights == [1 / 3] * 3
    assert [call["w"][0] for call in evaluation.calls] == SOUP_EVALUATED_MEANS  # all exact in binary
    assert [trial["path"] for trial in strategy.trials] == soup_order(paths)
    assert [trial["kept"] for trial in strategy.trials] == SOUP_KEPT
    assert [trial["score"] for trial in strategy.trials] == SOUP_SCORES
    assert [record.getMessage() for record in caplog.records if record.levelno == logging.INFO] == [
        f"greedy soup: {paths[1]} starts the soup, scoring 4",
        f"greedy soup: kept {paths[3]}: the mean of 2 checkpoints scores 1, better than 4",
        f"greedy soup: rejected {paths[2]}: the mean of 3 checkpoints would score 9, not better than 1",
        f"greedy soup: kept {paths[4]}: the mean of 3 checkpoints scores 0, better than 1",
        f"greedy soup: rejected {paths[0]}: the mean of 4 checkpoints would score 0, not better than 0",
    ]


def test_greedy_maximize_ranks_and_compares_high_values_first(tmp_path):
    """Recorded 1 - score (epoch 1 highest) and evaluate = -(w - 2)**2: the same trials, scores negated."""
    paths = write_soup_folder(tmp_path, recorded=lambda score: 1 - score)
    strategy = GreedySoup(maximize=True, evaluate=DistanceToTarget(sign=-1.0))
    assert select_from_folder(strategy, tmp_path) == ([paths[1], paths[3], paths[4]], [1 / 3] * 3)
    assert [trial["path"] for trial in strategy.trials] == soup_order(paths)
    assert [trial["score"] for trial in strategy.trials] == [-score for score in SOUP_SCORES]


def test_greedy_num_models_is_the_number_of_candidates_tried(tmp_path):
    paths = write_soup_folder(tmp_path)
    evaluation = DistanceToTarget()
    strategy = GreedySoup(num_models=2, evaluate=evaluation)
    assert select_from_folder(strategy, tmp_path) == ([paths[1], paths[3]], [0.5, 0.5])  # rows 1 and 2 only
    assert [call["w"][0] for call in evaluation.calls] == [0.0, 3.0]
    assert len(strategy.trials) == 2


@pytest.mark.parametrize("bad_score", [math.nan, math.inf, -math.inf])
def test_greedy_rejects_a_candidate_whose_evaluation_is_not_finite(tmp_path, bad_score):
    """w: 0 (score 4), then 12 (mean 6: evaluates to bad_score, rejected), then 4 (mean 2: 0 < 4, kept)."""
    first = write_checkpoint(tmp_path, 0, 0.1, {"w": [0.0]})
    write_checkpoint(tmp_path, 1, 0.2, {"w": [12.0]})
    third = write_checkpoint(tmp_path, 2, 0.3, {"w": [4.0]})

    def evaluate(arrays):
        w = arrays["w"].asscalar()
        return bad_score if w > 5 else (w - 2) ** 2

    strategy = GreedySoup(evaluate=evaluate)
    assert select_from_folder(strategy, tmp_path) == ([first, third], [0.5, 0.5])
    assert [trial["kept"] for trial in strategy.trials] == [True, False, True]


def test_greedy_any_finite_evaluation_beats_a_non_finite_start(tmp_path):
    """The best alone (w = 0) evaluates to NaN; the mean with w = 4 (2) to 0: kept."""
    first = write_checkpoint(tmp_path, 0, 0.1, {"w": [0.0]})
    second = write_checkpoint(tmp_path, 1, 0.2, {"w": [4.0]})
    strategy = GreedySoup(evaluate=lambda arrays: math.nan if arrays["w"].asscalar() == 0 else 0.0)
    assert select_from_folder(strategy, tmp_path) == ([first, second], [0.5, 0.5])


def test_greedy_skips_a_candidate_file_holding_nan_without_evaluating_it(tmp_path, caplog):
    """The best recorded checkpoint diverged: the soup starts with w = 1 (score 1), then 3 (mean 2: 0, kept)."""
    diverged = write_checkpoint(tmp_path, 0, 0.1, {"w": [np.nan]})
    second = write_checkpoint(tmp_path, 1, 0.2, {"w": [1.0]})
    third = write_checkpoint(tmp_path, 2, 0.3, {"w": [3.0]})
    evaluation = DistanceToTarget()
    strategy = GreedySoup(evaluate=evaluation)
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        assert select_from_folder(strategy, tmp_path) == ([second, third], [0.5, 0.5])
    assert [call["w"][0] for call in evaluation.calls] == [1.0, 2.0]
    assert strategy.trials[0] == {"path": diverged, "epoch_no": 0, "score": None, "kept": False}
    assert f"skipping checkpoint file {diverged}: it holds NaN or infinite values" in caplog.text


def test_greedy_evaluates_the_means_with_the_files_names_and_dtypes(tmp_path):
    """float16 weights stay float16; the integer ``steps`` is the best checkpoint's (epoch 1) in every mean."""
    write_soup_folder(tmp_path, dtype=np.float16)
    evaluation = DistanceToTarget()
    select_from_folder(GreedySoup(evaluate=evaluation), tmp_path)
    assert [call["w"][0] for call in evaluation.calls] == SOUP_EVALUATED_MEANS  # exact in float16 too
    for call in evaluation.calls:
        assert set(call) == {"w", "steps"} and call["w"].dtype == np.float16 and call["steps"].dtype == np.int32
        assert_array_equal(call["steps"], [1])


def test_greedy_apply_writes_the_soup_mean_and_average_depends_only_on_its_arguments(tmp_path):
    paths = write_soup_folder(tmp_path)
    strategy = GreedySoup(evaluate=DistanceToTarget())
    averaged = load_params(strategy.apply(str(tmp_path)))
    assert_allclose(averaged["w"].asnumpy(), [2.0])  # (0 + 6 + 0) / 3
    assert_array_equal(averaged["steps"].asnumpy(), [1])
    # no state kept between select_checkpoints and average: any selection is read from the files
    assert_allclose(strategy.average([paths[0], paths[2]], [0.5, 0.5])["w"].asnumpy(), [5.5])  # (2 + 9) / 2


def test_greedy_without_evaluate_says_what_to_do():
    with pytest.raises(ConfigurationError, match='the "greedy" strategy needs an evaluation: pass evaluate=callable'):
        GreedySoup().select_checkpoints(records([1.0]))


def test_modavg_average_with_greedy_exits_1_saying_it_cannot_evaluate(tmp_path, capsys):
    write_soup_folder(tmp_path)
    assert main(["average", str(tmp_path), "--strategy", "greedy"]) == 1
    error = capsys.readouterr().err
    assert error.startswith('modavg: error: the "greedy" strategy needs an evaluation: pass evaluate=')
    assert "`modavg average` and training without validation data cannot evaluate" in error
    assert not (tmp_path / "averaged_model-0000.params").exists()


def test_greedy_refuses_an_evaluate_that_is_not_a_callable_or_does_not_return_a_number(tmp_path):
    with pytest.raises(ConfigurationError, match=r"evaluate must be a callable\(arrays\) -> score, got 3 \(int\)"):
        GreedySoup(evaluate=3)
    write_checkpoint(tmp_path, 0, 1.0, {"w": [1.0]})
    with pytest.raises(ConfigurationError, match=r"evaluate must return a number .*, got 'low' \(str\)"):
        select_from_folder(GreedySoup(evaluate=lambda arrays: "low"), tmp_path)


def test_greedy_mismatched_shapes_are_named(tmp_path):
    write_checkpoint(tmp_path, 0, 1.0, {"w": [1.0]})
    write_checkpoint(tmp_path, 1, 2.0, {"w": [1.0, 2.0]})
    with pytest.raises(CheckpointError, match=r"parameter 'w' has shape \(2,\) in .*epoch-0001.params but \(1,\)"):
        select_from_folder(GreedySoup(evaluate=DistanceToTarget()), tmp_path)


def test_greedy_config_round_trip_leaves_evaluate_out(tmp_path):
    from gluonts.core import serde

    strategy = AveragingStrategy.from_config({"type": "greedy", "num_models": 3})
    assert isinstance(strategy, GreedySoup) and strategy.num_models == 3 and strategy.evaluate is None
    strategy.evaluate = lambda arrays: 0.0  # a lambda cannot be pickled
    write_soup_folder(tmp_path)
    select_from_folder(strategy, tmp_path)  # trials and the soup's mean are held too
    assert strategy == GreedySoup(num_models=3) and hash(strategy) == hash(GreedySoup(num_models=3))
    assert repr(strategy) == "GreedySoup(num_models=3, metric='score', maximize=False)"
    rebuilt_copies = [
        serde.decode(serde.encode(strategy)),
        pickle.loads(pickle.dumps(strategy)),
        copy.deepcopy(strategy),
    ]
    for rebuilt in rebuilt_copies:
        assert type(rebuilt) is GreedySoup and rebuilt == strategy
        assert rebuilt.evaluate is None and rebuilt.trials == []
    assert strategy.evaluate is not None and len(strategy.trials) == 3


def test_greedy_from_config_takes_evaluate_as_an_extra():
    evaluate = DistanceToTarget()
    assert AveragingStrategy.from_config("greedy", evaluate=evaluate).evaluate is evaluate
