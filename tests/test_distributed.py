"""A real dist_sync job on loopback: scheduler, one server and two workers as processes.

Every worker must end with the same EMA and the same final weights (rank 0's
choice of checkpoints), and only rank 0 may write checkpoint files. Both jobs
together take about 20 s here.
"""

import json
import os
import socket
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")
TIMEOUT_SECONDS = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def role_environment(role: str, port: int) -> dict:
    environment = dict(os.environ)
    environment.update(
        DMLC_ROLE=role,
        DMLC_PS_ROOT_URI="127.0.0.1",
        DMLC_PS_ROOT_PORT=str(port),
        DMLC_NUM_SERVER="1",
        DMLC_NUM_WORKER="2",
        DMLC_INTERFACE="lo",
        OMP_NUM_THREADS="1",
    )
    return environment


def run_job(mode: str, output: str) -> None:
    """Start scheduler, server and two workers; wait for the workers; always clean up."""
    port = free_port()
    serve = [sys.executable, "-c", "import mxnet"]  # importing MXNet with DMLC_ROLE=scheduler/server serves
    processes = []
    try:
        for role in ("scheduler", "server"):
            processes.append(subprocess.Popen(serve, env=role_environment(role, port), stderr=subprocess.DEVNULL))
        workers = [
            subprocess.Popen(
                [sys.executable, WORKER, mode, output],
                env=role_environment("worker", port),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        processes.extend(workers)
        for worker in workers:
            _, stderr = worker.communicate(timeout=TIMEOUT_SECONDS)
            assert worker.returncode == 0, stderr[-3000:]
        for server in processes[:2]:
            server.wait(timeout=30)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> str:
    output = str(tmp_path_factory.mktemp("dist"))
    run_job("module", output)
    return output


def test_gluon_loop_swapping_every_step_keeps_workers_identical(tmp_path):
    """Through ``set_data`` the first swap would raise 'Cannot reset distributed KVStore'."""
    run_job("gluon", str(tmp_path))
    for kind in ("raw", "ema"):
        first, second = (load(str(tmp_path), f"gluon-{kind}-{rank}.params") for rank in (0, 1))
        assert sorted(first) == sorted(second) and len(first) == 4
        for name in first:
            assert_array_equal(first[name], second[name], err_msg=f"{kind} {name}")


def load(job: str, name: str) -> dict:
    return {key: value.asnumpy() for key, value in mx.nd.load(os.path.join(job, name)).items()}


def test_every_worker_keeps_the_same_ema_of_the_weights_bit_for_bit(job):
    ema = [load(job, f"ema-{rank}.params") for rank in (0, 1)]
    assert sorted(ema[0]) == sorted(ema[1])
    weights = [name for name in ema[0] if name.startswith("arg:")]
    assert len(weights) == 6  # fc1, bn1 (gamma, beta), fc2
    for name in weights:
        assert_array_equal(ema[0][name], ema[1][name], err_msg=name)
    # BatchNorm running statistics are each worker's own (the kvstore never syncs aux states)
    assert not np.array_equal(ema[0]["aux:bn1_moving_mean"], ema[1]["aux:bn1_moving_mean"])


def test_only_rank_zero_writes_and_every_worker_ends_with_its_average(job):
    assert not os.path.exists(os.path.join(job, "rank1"))
    folder = os.path.join(job, "rank0")
    records = [
        json.load(open(os.path.join(folder, name)))
        for name in sorted(os.listdir(folder))
        if name.endswith(".json") and "epoch-info" in name
    ]
    assert len(records) == 2 and "model-symbol.json" in os.listdir(folder)
    metrics = [json.load(open(os.path.join(job, f"metrics-{rank}.json"))) for rank in (0, 1)]
    assert metrics[0]["accuracy"] != metrics[1]["accuracy"]  # the workers validate on different data
    best_of_rank_zero = sorted(range(3), key=lambda epoch: (-metrics[0]["accuracy"][epoch], epoch))[:2]
    assert sorted(record["epoch_no"] for record in records) == sorted(epoch + 1 for epoch in best_of_rank_zero)
    kept = [load(folder, record["params_path"]) for record in records]
    final = [load(job, f"final-{rank}.params") for rank in (0, 1)]
    for name in final[0]:
        assert_array_equal(final[0][name], final[1][name], err_msg=name)
        assert_allclose(
            final[0][name], np.mean([checkpoint[name] for checkpoint in kept], axis=0), rtol=1e-6, atol=1e-7
        )
