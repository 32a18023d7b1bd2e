"""The GPU benchmark script: it says so and measures nothing without a GPU; its CPU comparison works."""

import os
import subprocess
import sys

import mxnet as mx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # bench/ is not installed with the package

from bench import gpu
from bench.ema_update import TinyTensors


@pytest.mark.skipif(gpu.gpu_count() > 0, reason="a GPU is present: the script measures instead")
def test_without_a_gpu_the_script_says_so_and_exits_cleanly():
    completed = subprocess.run(
        [sys.executable, "-m", "bench.gpu"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "GPU: skipped: MXNet sees no GPU here" in completed.stdout


def test_the_check_against_the_cpu_path_compares_shadows_after_the_same_updates():
    network = TinyTensors(count=70, size=16)  # more arrays than one multi_sgd_update call takes
    network.initialize(mx.init.Uniform())
    assert gpu.largest_difference(network, mx.cpu(1)) == 0.0  # a second CPU device: the same path, the same result
