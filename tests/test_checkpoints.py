import json
import os

import mxnet as mx
import pytest

from modavg_plugin import save_epoch_info
from modavg_plugin.checkpoints import load_params, read_checkpoint_records, save_params


def test_save_epoch_info_writes_the_json_next_to_the_base_path(tmp_path):
    info = {"params_path": "epoch-0001.params", "epoch_no": 1, "score": 0.25}
    save_epoch_info(str(tmp_path / "epoch-0001"), info)
    assert json.loads((tmp_path / "epoch-0001-epoch-info.json").read_text()) == info
    assert os.listdir(tmp_path) == ["epoch-0001-epoch-info.json"]  # no temporary left behind


def test_save_epoch_info_is_atomic_when_writing_fails(tmp_path):
    path = tmp_path / "epoch-0001-epoch-info.json"
    save_epoch_info(str(tmp_path / "epoch-0001"), {"params_path": "a", "score": 1.0})
    with pytest.raises(TypeError):
        save_epoch_info(str(tmp_path / "epoch-0001"), {"params_path": "b", "score": object()})
    assert json.loads(path.read_text())["params_path"] == "a"  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["epoch-0001-epoch-info.json"]


def test_relative_params_paths_resolve_against_the_folder(tmp_path):
    save_params(str(tmp_path / "epoch-0000.params"), {"w": mx.nd.ones(2)})
    save_epoch_info(str(tmp_path / "epoch-0000"), {"params_path": "epoch-0000.params", "score": 1.0})
    (record,) = read_checkpoint_records(str(tmp_path))
    assert record["params_path"] == str(tmp_path / "epoch-0000.params")
    assert load_params(record["params_path"])["w"].shape == (2,)


def test_load_params_names_missing_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="missing.params does not exist"):
        load_params(str(tmp_path / "missing.params"))
    (tmp_path / "text.params").write_text("hello")
    with pytest.raises(ValueError, match="text.params is not a readable .params file"):
        load_params(str(tmp_path / "text.params"))
