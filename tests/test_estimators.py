"""Every MXNet estimator of GluonTS 0.17.0 that GluonTS itself can train here, trained with the EMA callback.

Tiny runs (2 epochs of 2 batches) on data statsmodels bundles (no downloads). For each estimator:

- ``test_ema_reaches_the_predictor``: with validation data, the predictor's network holds the EMA that a probe
  callback, listed after ours, lets us compute independently in NumPy from the raw weights after every step;
- ``test_strategy_reaches_the_predictor``: without validation data and with ``avg_strategy`` mean of 2, the
  predictor holds the mean of the two epochs' EMAs;
- the two runs differ in hybridization (which one is hybridized alternates down the list), so every estimator
  trains with and without validation data, hybridized and not, and the suite covers all four combinations;
- ``test_serde_round_trip_keeps_the_callback``: GluonTS's serde keeps the callback.

``test_mkldnn_reordered_weights`` adds WaveNet and MQCNN with 16-channel convolutions, with validation data,
hybridized and not: MKLDNN reorders their convolution weights in place during inference passes (validation
with the averages swapped in, forecasting), and ``copyto`` into a reordered array fails; these runs crashed
before every write into a network went through ``modavg_plugin.parameters.write_array``. (GluonTS alone, with
its default callbacks, cannot train these with validation data on an MKLDNN build: its ``copy_parameters`` into
the predictor, and its own ``ModelAveraging``, copy into weights the last validation pass reordered. With the
averaging callback they train, since its final write leaves plain layouts.)

GluonTS 0.17.0 cannot train these MXNet estimators here, with or without any callback; they are not tested:
see :data:`UNTRAINABLE`.
"""

import functools
from typing import Callable, Dict, List, NamedTuple, Tuple

import mxnet as mx
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from gluonts.core import serde
from gluonts.dataset.common import ListDataset
from gluonts.mx import Trainer
from gluonts.mx.block.decoder import ForkingMLPDecoder
from gluonts.mx.block.encoder import RNNEncoder
from gluonts.mx.block.quantile_output import QuantileOutput
from gluonts.mx.model.canonical._estimator import CanonicalEstimator, CanonicalRNNEstimator, MLPForecasterEstimator
from gluonts.mx.model.deep_factor import DeepFactorEstimator
from gluonts.mx.model.deepar import DeepAREstimator
from gluonts.mx.model.deepstate import DeepStateEstimator
from gluonts.mx.model.deepvar import DeepVAREstimator
from gluonts.mx.model.deepvar_hierarchical import DeepVARHierarchicalEstimator
from gluonts.mx.model.gp_forecaster import GaussianProcessEstimator
from gluonts.mx.model.gpvar import GPVAREstimator
from gluonts.mx.model.lstnet import LSTNetEstimator
from gluonts.mx.model.n_beats import NBEATSEnsembleEstimator, NBEATSEnsemblePredictor, NBEATSEstimator
from gluonts.mx.model.renewal import DeepRenewalProcessEstimator
from gluonts.mx.model.seq2seq import MQCNNEstimator, MQRNNEstimator
from gluonts.mx.model.seq2seq._forking_estimator import ForkingSeq2SeqEstimator
from gluonts.mx.model.simple_feedforward import SimpleFeedForwardEstimator
from gluonts.mx.model.tft import TemporalFusionTransformerEstimator
from gluonts.mx.model.transformer import TransformerEstimator
from gluonts.mx.model.wavenet import WaveNetEstimator
from gluonts.mx.trainer.callback import Callback
from gluonts.time_feature import month_of_year
from numpy.testing import assert_allclose

from modavg_plugin import AveragingCallback, ExponentialAveragingCallback

# GluonTS 0.17 still writes quarterly and yearly frequencies as pandas deprecates them: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:'[QY]' is deprecated:FutureWarning")

UNTRAINABLE = {
    "Seq2SeqEstimator, MLP2QRForecaster, RNN2QRForecaster, CNN2QRForecaster": (
        "GluonTS bugs in its Seq2Seq training network: hybridized, the decoder's dense bias fails deferred shape "
        "inference (ValueError in Block._deferred_infer_shape); not hybridized, batch_dot gets a 2-D operand "
        "('batch_dot currently only support N-D*N-D array (N >= 3)'). The same with GluonTS's default callbacks only."
    ),
    "DeepTPPEstimator": (
        "Refuses hybridize=True (its own assertion); not hybridized, GluonTS builds its "
        "ContinuousTimeInstanceSplitter without the required freq (pydantic ValidationError: field required)."
    ),
}
"""The MXNet estimators of GluonTS 0.17.0 that GluonTS cannot train here, and why (not tested)."""

DECAY = 0.9
EPOCHS = 2
BATCHES = 2
PREDICTION_LENGTH = 4
CONTEXT_LENGTH = 8
BATCH_SIZE = 8
FREQ = "Q"


# Data: statsmodels' bundled data sets ----------------------------------------------------------------------

Data = Tuple[ListDataset, ListDataset]  # training data, and validation data (the full series, also forecast from)
MACRO_COLUMNS = ["realgdp", "realcons", "realinv", "realgovt"]
MACRO_START = pd.Period("1959Q1", freq=FREQ)


@functools.lru_cache(maxsize=None)
def macro_frame() -> pd.DataFrame:
    return sm.datasets.macrodata.load_pandas().data


def univariate() -> Data:
    """Four quarterly US macro series (203 points), each its own item with a static category."""
    frame = macro_frame()

    def entries(cut: int) -> List[dict]:
        return [
            {"target": frame[column].values[: len(frame) - cut].astype(np.float32), "start": MACRO_START,
             "feat_static_cat": [index], "item_id": column}
            for index, column in enumerate(MACRO_COLUMNS)
        ]  # fmt: skip

    return ListDataset(entries(PREDICTION_LENGTH), freq=FREQ), ListDataset(entries(0), freq=FREQ)


def multivariate_of(target: np.ndarray) -> Data:
    def dataset(cut: int) -> ListDataset:
        entry = {"target": target[:, : target.shape[1] - cut], "start": MACRO_START}
        return ListDataset([entry], freq=FREQ, one_dim_target=False)

    return dataset(PREDICTION_LENGTH), dataset(0)


def multivariate() -> Data:
    """The same four series as one standardised (4, T) target."""
    target = macro_frame()[MACRO_COLUMNS].values.T.astype(np.float32)
    return multivariate_of((target - target.mean(axis=1, keepdims=True)) / target.std(axis=1, keepdims=True))


HIERARCHY = np.array([[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)  # total, then the three parts


def hierarchical() -> Data:
    """A coherent hierarchy: real consumption, investment and government spending (in 1000s), and their total."""
    bottom = macro_frame()[["realcons", "realinv", "realgovt"]].values.T.astype(np.float32) / 1000.0
    return multivariate_of(HIERARCHY @ bottom)


def counts() -> Data:
    """Yearly sunspot numbers (1700-2008), rounded: counts for the renewal process."""
    target = np.round(sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].values).astype(np.float32)
    start = pd.Period("1700", freq="Y")

    def dataset(cut: int) -> ListDataset:
        return ListDataset([{"target": target[: len(target) - cut], "start": start}], freq="Y")

    return dataset(PREDICTION_LENGTH), dataset(0)


# One tiny configuration per estimator ------------------------------------------------------------------------

Make = Callable[[Trainer], object]
SMALL = dict(prediction_length=PREDICTION_LENGTH, context_length=CONTEXT_LENGTH, batch_size=BATCH_SIZE)
SAMPLED = dict(num_parallel_samples=10)
QUANTILES = dict(quantiles=[0.1, 0.5, 0.9])
MULTIVARIATE = dict(freq=FREQ, lags_seq=[1, 4], time_features=[month_of_year], num_layers=1, num_cells=8)  # the
# default time features of DeepVAR, GPVAR and DeepVARHierarchical refuse quarterly data
NBEATS = dict(
    freq=FREQ, num_stacks=2, widths=[16], num_blocks=[1], num_block_layers=[2], expansion_coefficient_lengths=[4],
    sharing=[False], stack_types=["G"],
)  # fmt: skip


def mqcnn(channels: List[int]) -> Make:
    return lambda trainer: MQCNNEstimator(
        freq=FREQ, channels_seq=channels, dilation_seq=[1, 2][: len(channels)], kernel_size_seq=[2] * len(channels),
        decoder_mlp_dim_seq=[8], **QUANTILES, **SMALL, trainer=trainer,
    )  # fmt: skip


CONFIGS: Dict[str, Tuple[Make, Callable[[], Data]]] = {
    "SimpleFeedForward": (lambda trainer: SimpleFeedForwardEstimator(
        num_hidden_dimensions=[8], batch_normalization=False, **SMALL, trainer=trainer), univariate),
    "SimpleFeedForward-BatchNorm": (lambda trainer: SimpleFeedForwardEstimator(
        num_hidden_dimensions=[8], batch_normalization=True, **SMALL, trainer=trainer), univariate),
    "DeepAR": (lambda trainer: DeepAREstimator(
        freq=FREQ, num_layers=1, num_cells=8, lags_seq=[1, 4], **SAMPLED, **SMALL, trainer=trainer), univariate),
    "DeepState": (lambda trainer: DeepStateEstimator(
        freq=FREQ, prediction_length=PREDICTION_LENGTH, cardinality=[4], past_length=16, num_layers=1, num_cells=8,
        batch_size=BATCH_SIZE, **SAMPLED, trainer=trainer), univariate),
    "DeepFactor": (lambda trainer: DeepFactorEstimator(
        freq=FREQ, num_hidden_global=8, num_factors=2, num_hidden_local=4, cardinality=[4], **SAMPLED, **SMALL,
        trainer=trainer), univariate),
    "DeepVAR": (lambda trainer: DeepVAREstimator(
        target_dim=4, rank=2, conditioning_length=20, **MULTIVARIATE, **SAMPLED, **SMALL, trainer=trainer),
        multivariate),
    "DeepVARHierarchical": (lambda trainer: DeepVARHierarchicalEstimator(
        S=HIERARCHY, num_samples_for_loss=10, **MULTIVARIATE, **SAMPLED, **SMALL, trainer=trainer), hierarchical),
    "GPVAR": (lambda trainer: GPVAREstimator(
        target_dim=4, rank=2, conditioning_length=20, **MULTIVARIATE, **SAMPLED, **SMALL, trainer=trainer),
        multivariate),
    "GaussianProcess": (lambda trainer: GaussianProcessEstimator(
        freq=FREQ, cardinality=4, **SAMPLED, **SMALL, trainer=trainer), univariate),
    "LSTNet": (lambda trainer: LSTNetEstimator(
        num_series=4, skip_size=2, ar_window=2, channels=8, kernel_size=2, rnn_num_cells=8, rnn_num_layers=1,
        skip_rnn_num_cells=4, **SMALL, trainer=trainer), multivariate),
    "NBEATS": (lambda trainer: NBEATSEstimator(**NBEATS, **SMALL, trainer=trainer), univariate),
    "NBEATSEnsemble": (lambda trainer: NBEATSEnsembleEstimator(  # two members
        prediction_length=PREDICTION_LENGTH, meta_context_length=[2, 3], meta_loss_function=["MAPE"],
        meta_bagging_size=1, batch_size=BATCH_SIZE, **NBEATS, trainer=trainer), univariate),
    "DeepRenewalProcess": (lambda trainer: DeepRenewalProcessEstimator(
        num_cells=8, num_layers=1, **SAMPLED, **SMALL, trainer=trainer), counts),
    "MQCNN": (mqcnn([8]), univariate),
    "MQRNN": (lambda trainer: MQRNNEstimator(
        freq=FREQ, decoder_mlp_dim_seq=[8], **QUANTILES, **SMALL, trainer=trainer), univariate),
    "ForkingSeq2Seq": (lambda trainer: ForkingSeq2SeqEstimator(
        encoder=RNNEncoder(mode="gru", hidden_size=8, num_layers=1, bidirectional=False, use_static_feat=True,
                           use_dynamic_feat=True),
        decoder=ForkingMLPDecoder(dec_len=PREDICTION_LENGTH, final_dim=4),
        quantile_output=QuantileOutput([0.1, 0.5, 0.9]), freq=FREQ, **SMALL, trainer=trainer), univariate),
    "Transformer": (lambda trainer: TransformerEstimator(
        freq=FREQ, model_dim=8, inner_ff_dim_scale=2, num_heads=2, lags_seq=[1, 4], **SAMPLED, **SMALL,
        trainer=trainer), univariate),
    "TemporalFusionTransformer": (lambda trainer: TemporalFusionTransformerEstimator(
        freq=FREQ, hidden_dim=8, num_heads=2, num_instance_per_series=4, **SMALL, trainer=trainer), univariate),
    "WaveNet": (lambda trainer: WaveNetEstimator(
        freq=FREQ, prediction_length=PREDICTION_LENGTH, num_bins=64, n_residue=8, n_skip=8, dilation_depth=2,
        n_stacks=1, batch_size=BATCH_SIZE, **SAMPLED, trainer=trainer), univariate),
    "CanonicalRNN": (lambda trainer: CanonicalRNNEstimator(  # no batch_size argument
        freq=FREQ, context_length=CONTEXT_LENGTH, prediction_length=PREDICTION_LENGTH, num_layers=1, num_cells=8,
        **SAMPLED, trainer=trainer), univariate),
    "MLPForecaster": (lambda trainer: MLPForecasterEstimator(  # no batch_size argument
        freq=FREQ, context_length=CONTEXT_LENGTH, prediction_length=PREDICTION_LENGTH, hidden_dim_sequence=[8],
        **SAMPLED, trainer=trainer), univariate),
    "Canonical": (lambda trainer: CanonicalEstimator(
        model=mx.gluon.nn.Dense(8, flatten=False), is_sequential=False, freq=FREQ, **SAMPLED, **SMALL,
        trainer=trainer), univariate),
    # 16 output channels: MKLDNN reorders convolution weights whose output channels are a multiple of 8
    "MQCNN-16x16": (mqcnn([16, 16]), univariate),
}  # fmt: skip

ESTIMATORS = [name for name in CONFIGS if name != "MQCNN-16x16"]  # the list, in its order
MKLDNN_ESTIMATORS = ["WaveNet", "MQCNN-16x16"]

EMA_CONFIG = {"type": "exponential", "decay": DECAY}
STRATEGY_CONFIG = {**EMA_CONFIG, "avg_strategy": {"type": "mean", "num_models": 2}}


# Training with a probe that records the raw weights ------------------------------------------------------------

Weights = Dict[str, np.ndarray]


def relative_name(name: str, *prefixes: str) -> str:
    """``name`` without the first of ``prefixes`` it starts with (Gluon's per-network prefix)."""
    for prefix in prefixes:
        if prefix and name.startswith(prefix):
            return name[len(prefix) :]
    return name


def held_weights(network: mx.gluon.Block, *prefixes: str) -> Weights:
    """The network's weights in float64, named without the first of ``prefixes`` (default: its own) they carry."""
    return {
        relative_name(name, *(prefixes or (network.prefix,))): parameter.data().asnumpy().astype(np.float64)
        for name, parameter in network.collect_params().items()
    }


class Probe(Callback):
    """Listed after the averaging callback: the raw weights the trainer's hooks see, by name relative to the network."""

    def __init__(self) -> None:
        self.network = None
        self.raw_after_step: List[Weights] = []  # [0]: the initial weights; [k]: after the k-th optimiser step
        self.steps_at_epoch_end: List[int] = []

    def on_network_initializing_end(self, training_network, **kwargs) -> None:
        self.network = training_network
        self.raw_after_step = [held_weights(training_network)]

    def on_train_batch_end(self, training_network, **kwargs) -> bool:  # not called for NaN-loss batches
        self.raw_after_step.append(held_weights(training_network))
        return True

    def on_train_epoch_end(self, **kwargs) -> bool:
        self.steps_at_epoch_end.append(len(self.raw_after_step) - 1)
        return True

    def ema(self, steps: int) -> Weights:
        """The EMA after ``steps`` steps, computed in NumPy: decay min(DECAY, (1 + k) / (10 + k)) at step k."""
        shadows = dict(self.raw_after_step[0])
        for k in range(1, steps + 1):
            decay = min(DECAY, (1 + k) / (10 + k))
            shadows = {
                name: decay * shadow + (1 - decay) * self.raw_after_step[k][name] for name, shadow in shadows.items()
            }
        return shadows


class Run(NamedTuple):
    callback: AveragingCallback
    probe: Probe
    estimator: object
    predictor: object
    forecast_data: ListDataset


def train(name: str, config: dict, validation: bool, hybridize: bool) -> Run:
    """Train ``name`` with the callback ``config`` describes, then the probe; validation data: the full series."""
    mx.random.seed(0)
    np.random.seed(0)
    callback, probe = AveragingCallback.from_config(config), Probe()
    trainer = Trainer(
        epochs=EPOCHS,
        num_batches_per_epoch=BATCHES,
        learning_rate=1e-3,
        hybridize=hybridize,
        callbacks=[callback, probe],
    )
    make, data = CONFIGS[name]
    estimator = make(trainer)
    training_data, full_data = data()
    predictor = estimator.train(training_data, validation_data=full_data if validation else None)
    return Run(callback, probe, estimator, predictor, full_data)


def trained_members(run: Run) -> List[Tuple[AveragingCallback, Probe, mx.gluon.Block]]:
    """Each trained network's callback, probe, and the network its predictor forecasts with.

    NBEATSEnsemble trains one member estimator per configuration, each with a deep copy of the Trainer made
    when the ensemble is constructed, so the callbacks (ours and the probe) that run are the member's copies,
    never the ones given; each member's predictor then holds the member's own average. (The copies share
    any ``checkpoint_dir``: the second member then refuses the folder the first one filled, a CheckpointError.)
    """
    if isinstance(run.predictor, NBEATSEnsemblePredictor):
        members = []
        for member, predictor in zip(run.estimator.estimators, run.predictor.predictors):
            callbacks = member.trainer.callbacks.callbacks
            callback = next(c for c in callbacks if isinstance(c, AveragingCallback))
            probe = next(c for c in callbacks if isinstance(c, Probe))
            members.append((callback, probe, predictor.prediction_net))
        assert len(members) == 2
        assert run.callback.num_updates == 0 and run.callback.history == []  # the callback given never runs
        return members
    return [(run.callback, run.probe, run.predictor.prediction_net)]


# WaveNet's predictor has one parameter the training network lacks: the bins' values (a constant)
PREDICTOR_OWN = {"lookupvalues0_bin_values"}


def assert_holds(prediction_net: mx.gluon.Block, probe: Probe, expected: Weights, unlike: Weights) -> None:
    """The predictor's network holds ``expected`` in every parameter it shares a name with the training network.

    A predictor shares the training network's parameters (names with the training network's prefix) or has
    copies of them (names with its own prefix), or some of each; WaveNet's has one of its own too.
    ``unlike`` (e.g. the last raw weights) must differ from ``expected``, or the check could not tell them apart.
    """
    held = held_weights(prediction_net, probe.network.prefix, prediction_net.prefix)
    common = sorted(held.keys() & expected.keys())
    assert set(common) == expected.keys(), f"the predictor lacks {sorted(expected.keys() - held.keys())}"
    assert held.keys() - expected.keys() <= PREDICTOR_OWN, f"unexpected {sorted(held.keys() - expected.keys())}"
    for name in common:
        assert_allclose(held[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert max(np.max(np.abs(expected[name] - unlike[name]), initial=0.0) for name in common) > 1e-4


def assert_finite_forecasts(run: Run) -> None:
    forecasts = list(run.predictor.predict(run.forecast_data))
    assert len(forecasts) == len(run.forecast_data)
    for forecast in forecasts:
        median = forecast.quantile(0.5)
        assert median.shape[0] == PREDICTION_LENGTH and np.isfinite(median).all(), median


def modes(names: List[str], first_hybridized: bool) -> List:
    """One parameter set per estimator; hybridized or not alternates down the list."""
    params = []
    for index, name in enumerate(names):
        hybridize = (index % 2 == 0) == first_hybridized
        params.append(pytest.param(name, hybridize, id=f"{name}-{'hybridized' if hybridize else 'imperative'}"))
    return params


@pytest.fixture(autouse=True)
def engine_settled():
    """MXNet raises an operator's error at the next wait on the engine: wait here, so it stays with its test."""
    yield
    mx.nd.waitall()


# The tests -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, hybridize", modes(ESTIMATORS, first_hybridized=True))
def test_ema_reaches_the_predictor(name, hybridize):
    """With validation data (run with the averages swapped in): the predictor holds the EMA of every step."""
    run = train(name, EMA_CONFIG, validation=True, hybridize=hybridize)
    for callback, probe, prediction_net in trained_members(run):
        steps = len(probe.raw_after_step) - 1
        assert callback.num_updates == steps > 0
        assert [entry["epoch_no"] for entry in callback.history] == list(range(EPOCHS))
        assert all(np.isfinite(entry["validation_loss"]) for entry in callback.history)
        assert_holds(prediction_net, probe, probe.ema(steps), unlike=probe.raw_after_step[-1])
    assert_finite_forecasts(run)


@pytest.mark.parametrize("name, hybridize", modes(ESTIMATORS, first_hybridized=False))
def test_strategy_reaches_the_predictor(name, hybridize):
    """Without validation data, mean of the 2 best of 2 epochs: the predictor holds the mean of the epochs' EMAs."""
    run = train(name, STRATEGY_CONFIG, validation=False, hybridize=hybridize)
    for callback, probe, prediction_net in trained_members(run):
        assert len(probe.steps_at_epoch_end) == EPOCHS and callback.num_updates == probe.steps_at_epoch_end[-1]
        epoch_averages = [probe.ema(steps) for steps in probe.steps_at_epoch_end]
        expected = {name: np.mean([average[name] for average in epoch_averages], axis=0) for name in epoch_averages[0]}
        assert_holds(prediction_net, probe, expected, unlike=epoch_averages[-1])
    assert_finite_forecasts(run)


def is_reordered(array: mx.nd.NDArray) -> bool:
    """Whether MKLDNN holds ``array`` in a blocked layout (no plain view of it can be made then)."""
    try:
        array.to_dlpack_for_read()
    except mx.base.MXNetError as error:
        if "MKLDNN" in str(error):
            return True
        raise
    return False


@pytest.mark.parametrize("hybridize", [True, False], ids=["hybridized", "imperative"])
@pytest.mark.parametrize("name", MKLDNN_ESTIMATORS)
def test_mkldnn_reordered_weights(name, hybridize):
    """Convolutions MKLDNN reorders in place during inference passes: validation swaps, the final write, forecasts."""
    run = train(name, EMA_CONFIG, validation=True, hybridize=hybridize)
    ((callback, probe, prediction_net),) = trained_members(run)
    steps = len(probe.raw_after_step) - 1
    assert callback.num_updates == steps > 0 and len(callback.history) == EPOCHS
    assert_holds(prediction_net, probe, probe.ema(steps), unlike=probe.raw_after_step[-1])
    assert_finite_forecasts(run)
    if mx.runtime.Features().is_enabled("MKLDNN"):  # the premise: this build reorders the predictor's weights
        assert any(is_reordered(p.data()) for p in prediction_net.collect_params().values())
    # and reading the averages back from reordered arrays still gives them
    assert_holds(prediction_net, probe, probe.ema(steps), unlike=probe.raw_after_step[-1])


@pytest.mark.parametrize("name", ESTIMATORS)
def test_serde_round_trip_keeps_the_callback(name):
    if name == "Canonical":
        pytest.skip("CanonicalEstimator's model argument, a raw HybridBlock, is not serializable by GluonTS's serde")
    callback = AveragingCallback.from_config(STRATEGY_CONFIG)
    estimator = CONFIGS[name][0](Trainer(epochs=EPOCHS, callbacks=[callback]))
    text = serde.dump_json(estimator)
    loaded = serde.load_json(text)
    (averaging,) = [c for c in loaded.trainer.callbacks.callbacks if isinstance(c, AveragingCallback)]
    assert type(averaging) is ExponentialAveragingCallback and averaging is not callback
    assert averaging.decay == DECAY and averaging.avg_strategy == callback.avg_strategy
    assert serde.dump_json(loaded) == text
