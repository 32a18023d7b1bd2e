"""One worker of a loopback dist_sync job run by tests/test_distributed.py (not a test module).

``module OUTPUT``: trains the small Module of tests/conftest.py with
``kvstore='dist_sync'`` through ModuleAveraging (EMA + mean of the 2 best
epochs by validation accuracy), each worker on its own data and its own
validation set, then writes what it ended with into OUTPUT:
``final-RANK.params``, ``ema-RANK.params`` and ``metrics-RANK.json`` (its
validation accuracies).

``gluon OUTPUT``: a plain Gluon loop, Adam through a ``dist_sync`` kvstore,
the EMA applied and swapped in and out around an evaluation after every
step; writes ``gluon-raw-RANK.params`` and ``gluon-ema-RANK.params``.
"""

import json
import os
import sys

import mxnet as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from modavg_plugin import ExponentialMovingAverage
from modavg_plugin.module import ModuleAveraging

from conftest import data_iterator, fit_arguments, module_symbol


def gluon_loop(output: str) -> None:
    kvstore = mx.kv.create("dist_sync")
    rank = kvstore.rank
    mx.random.seed(7)
    np.random.seed(7)
    net = mx.gluon.nn.HybridSequential()
    net.add(mx.gluon.nn.Dense(16, activation="relu", in_units=5), mx.gluon.nn.Dense(3, in_units=16))
    net.initialize(mx.init.Xavier())
    trainer = mx.gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 0.05}, kvstore=kvstore)
    ema = ExponentialMovingAverage(net.collect_params().items(), decay=0.9)
    loss_function = mx.gluon.loss.SoftmaxCrossEntropyLoss()
    batches, validation = data_iterator(10 + rank), data_iterator(20 + rank)
    for step, batch in enumerate(batches, start=1):
        with mx.autograd.record():
            loss = loss_function(net(batch.data[0]), batch.label[0])
        loss.backward()
        trainer.step(batch.data[0].shape[0])
        ema.apply(num_updates=step)
        with ema.average_parameters():  # swapped in and out after every step
            net(next(iter(validation)).data[0]).wait_to_read()
    raw = {name: parameter.data() for name, parameter in net.collect_params().items()}
    mx.nd.save(os.path.join(output, f"gluon-raw-{rank}.params"), raw)
    mx.nd.save(os.path.join(output, f"gluon-ema-{rank}.params"), dict(ema.shadows))


def module_fit(output: str) -> None:
    kvstore = mx.kv.create("dist_sync")
    rank = kvstore.rank
    mx.random.seed(7)  # identical initial weights on every worker
    np.random.seed(7)
    module = mx.mod.Module(module_symbol(), context=mx.cpu())
    averaging = ModuleAveraging(
        module,
        {"type": "exponential", "decay": 0.9},
        {"type": "mean", "num_models": 2, "metric": "accuracy", "maximize": True},
        checkpoint_prefix=os.path.join(output, f"rank{rank}", "model"),
    )
    accuracies = []
    averaging.fit(
        data_iterator(10 + rank),
        eval_data=data_iterator(20 + rank),
        eval_end_callback=lambda params: accuracies.append(dict(params.eval_metric.get_name_value())["accuracy"]),
        **{**fit_arguments(), "kvstore": kvstore},
    )
    arg_params, aux_params = module.get_params()
    final = {f"arg:{k}": v for k, v in arg_params.items()}
    final.update({f"aux:{k}": v for k, v in aux_params.items()})
    mx.nd.save(os.path.join(output, f"final-{rank}.params"), final)
    mx.nd.save(os.path.join(output, f"ema-{rank}.params"), dict(averaging.moving_average.shadows))
    with open(os.path.join(output, f"metrics-{rank}.json"), "w") as file:
        json.dump({"rank": rank, "accuracy": accuracies}, file)


if __name__ == "__main__":
    {"gluon": gluon_loop, "module": module_fit}[sys.argv[1]](sys.argv[2])
