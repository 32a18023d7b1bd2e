import errno
import json
import logging
import math
import os
import re
import stat
import threading

import mxnet as mx
import numpy as np
import pytest

from modavg_plugin import CheckpointError, save_epoch_info
from modavg_plugin.files import save_params
from modavg_plugin.folders import MAX_EPOCH_INFO_BYTES, read_checkpoint_records
from modavg_plugin.params_files import load_params
from modavg_plugin.weighted_sum import average_arrays, check_weights, normalised_weights


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


# crash-safe writes


def test_write_atomically_syncs_the_file_then_renames_then_syncs_the_folder(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(descriptor):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "fsync file")
        fsync(descriptor)

    def recording_replace(source, target):
        events.append(f"rename {os.path.basename(source)[:5]} -> {os.path.basename(target)}")
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    save_params(str(tmp_path / "a.params"), {"w": mx.nd.ones(2)})
    assert events == ["fsync file", "rename .tmp- -> a.params", "fsync folder"]


@pytest.mark.parametrize("failure", ["cannot open folders", "EINVAL"])
def test_folder_sync_is_skipped_where_the_system_does_not_allow_it(tmp_path, monkeypatch, failure):
    open_, fsync = os.open, os.fsync

    def no_folder_open(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied", path)  # what Windows answers
        return open_(path, flags, *args)

    def no_folder_fsync(descriptor):
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        fsync(descriptor)

    if failure == "cannot open folders":
        monkeypatch.setattr(os, "open", no_folder_open)
    else:
        monkeypatch.setattr(os, "fsync", no_folder_fsync)
    save_params(str(tmp_path / "a.params"), {"w": mx.nd.ones(2)})
    assert load_params(str(tmp_path / "a.params"))["w"].shape == (2,)


def test_a_folder_sync_io_error_is_raised(tmp_path, monkeypatch):
    fsync = os.fsync

    def failing_folder_fsync(descriptor):
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", failing_folder_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        save_epoch_info(str(tmp_path / "epoch-0001"), {"params_path": "a", "score": 1.0})


# reading a folder: leftovers, missing files, hostile epoch info


def write_checkpoint(folder, stem: str, info: dict, values=(1.0,)) -> str:
    """``{stem}.params`` holding ``w`` and ``{stem}-epoch-info.json`` holding ``info`` (``params_path`` defaulted)."""
    params_path = os.path.join(str(folder), f"{stem}.params")
    save_params(params_path, {"w": mx.nd.array(values)})
    save_epoch_info(os.path.join(str(folder), stem), {"params_path": f"{stem}.params", **info})
    return params_path


def info_names(records) -> list:
    return [os.path.basename(record["info_path"]) for record in records]


def warnings_of(caplog) -> list:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


def test_leftovers_of_interrupted_writes_are_ignored_and_named_in_one_warning(tmp_path, caplog):
    write_checkpoint(tmp_path, "epoch-0000", {"epoch_no": 0, "score": 1.0})
    (tmp_path / ".tmp-a1b2-epoch-0001.params").write_bytes(b"\x12\x01\x00\x00")
    # a complete leftover record (killed between its fsync and its rename) is ignored too
    (tmp_path / ".tmp-c3d4-epoch-0001-epoch-info.json").write_text('{"params_path": "epoch-0000.params", "score": 0}')
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        records = read_checkpoint_records(str(tmp_path))
    assert info_names(records) == ["epoch-0000-epoch-info.json"]
    (warning,) = warnings_of(caplog)
    assert warning.startswith(f"ignoring 2 temporary file(s) in {tmp_path}")
    assert ".tmp-a1b2-epoch-0001.params" in warning and ".tmp-c3d4-epoch-0001-epoch-info.json" in warning


def test_a_folder_of_leftovers_only_is_an_error(tmp_path):
    (tmp_path / ".tmp-c3d4-epoch-0001-epoch-info.json").write_text("{")
    with pytest.raises(CheckpointError, match=f"no checkpoints .* in folder {tmp_path}"):
        read_checkpoint_records(str(tmp_path))


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "a folder"])
def test_epoch_info_whose_params_file_is_unusable_is_skipped_with_a_warning(tmp_path, caplog, damage):
    write_checkpoint(tmp_path, "epoch-0000", {"epoch_no": 0, "score": 1.0})
    broken = write_checkpoint(tmp_path, "epoch-0001", {"epoch_no": 1, "score": 0.5})
    if damage == "missing":
        os.remove(broken)
    elif damage == "a folder":
        os.remove(broken)
        os.mkdir(broken)
    else:
        data = open(broken, "rb").read()
        open(broken, "wb").write(b"" if damage == "empty" else data[:-3])
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        records = read_checkpoint_records(str(tmp_path))
    assert info_names(records) == ["epoch-0000-epoch-info.json"]
    (warning,) = warnings_of(caplog)
    assert warning.startswith(
        f"skipping 1 of the epoch-info files in {tmp_path}: epoch-0001-epoch-info.json: checkpoint file {broken}"
    )
    expected = {"missing": "does not exist", "a folder": "is not a regular file"}.get(damage, "truncated")
    assert expected in warning


def test_nothing_usable_is_one_error_naming_the_folder_and_each_reason(tmp_path, caplog):
    os.remove(write_checkpoint(tmp_path, "epoch-0000", {"epoch_no": 0, "score": 1.0}))
    (tmp_path / "epoch-0001-epoch-info.json").write_text("{not json")
    write_checkpoint(tmp_path, "epoch-0002", {"epoch_no": -2, "score": 1.0})
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        with pytest.raises(CheckpointError) as raised:
            read_checkpoint_records(str(tmp_path))
    message = str(raised.value)
    assert message.startswith(f"no usable checkpoint in folder {tmp_path}: all 3 epoch-info files were skipped (")
    assert f"epoch-0000-epoch-info.json: checkpoint file {tmp_path / 'epoch-0000.params'} does not exist" in message
    assert "epoch-0001-epoch-info.json: not JSON (" in message
    assert "epoch-0002-epoch-info.json: 'epoch_no' must be an integer >= 0, got -2 (int)" in message
    assert warnings_of(caplog) == []  # the error says it all


HOSTILE_EPOCH_INFO = {
    "not JSON": (b"{not json", "not JSON ("),
    "not UTF-8": (b'{"params_path": "\xff\xfe"}', "not UTF-8 text"),
    "a list": (b"[1, 2, 3]", "not a JSON object (a list)"),
    "a string": (b'"epoch-0001.params"', "not a JSON object (a str)"),
    "null": (b"null", "not a JSON object (a NoneType)"),
    "nested deeply": (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    "huge integer": (b'{"params_path": "a.params", "epoch_no": 1' + b"0" * 5000 + b"}", "not JSON ("),
    "no params_path": (
        b'{"epoch_no": 1, "score": 0.5}',
        "'params_path' must be a non-empty file name or path, got nothing",
    ),
    "params_path a number": (b'{"params_path": 3, "score": 0.5}', "got 3 (int)"),
    "params_path a list": (b'{"params_path": ["a.params"], "score": 0.5}', "got ['a.params'] (list)"),
    "params_path empty": (b'{"params_path": "", "score": 0.5}', "got '' (str)"),
    "params_path with NUL": (b'{"params_path": "a\\u0000.params", "score": 0.5}', "got 'a\\x00.params' (str)"),
    "epoch_no a string": (
        b'{"params_path": "a.params", "epoch_no": "3"}',
        "'epoch_no' must be an integer >= 0, got '3' (str)",
    ),
    "epoch_no a float": (b'{"params_path": "a.params", "epoch_no": 3.0}', "got 3.0 (float)"),
    "epoch_no a boolean": (b'{"params_path": "a.params", "epoch_no": true}', "got True (bool)"),
    "epoch_no negative": (b'{"params_path": "a.params", "epoch_no": -1}', "got -1 (int)"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_EPOCH_INFO))
def test_hostile_epoch_info_is_skipped_with_the_reason(tmp_path, caplog, case):
    content, reason = HOSTILE_EPOCH_INFO[case]
    write_checkpoint(tmp_path, "a", {"epoch_no": 0, "score": 1.0})
    (tmp_path / "b-epoch-info.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        records = read_checkpoint_records(str(tmp_path))
    assert info_names(records) == ["a-epoch-info.json"]
    (warning,) = warnings_of(caplog)
    assert warning.startswith(f"skipping 1 of the epoch-info files in {tmp_path}: b-epoch-info.json: ")
    assert reason in warning
    assert len(warning) < 400  # a huge value is cut, not copied into the log


def test_epoch_info_of_exactly_the_size_cap_is_read_and_one_byte_more_is_not(tmp_path, caplog):
    params_path = write_checkpoint(tmp_path, "a", {"score": 1.0})
    body = json.dumps({"params_path": os.path.basename(params_path), "score": 1.0})
    (tmp_path / "a-epoch-info.json").write_text(body + " " * (MAX_EPOCH_INFO_BYTES - len(body)))
    assert info_names(read_checkpoint_records(str(tmp_path))) == ["a-epoch-info.json"]
    write_checkpoint(tmp_path, "b", {"score": 2.0})
    (tmp_path / "a-epoch-info.json").write_text(body + " " * (MAX_EPOCH_INFO_BYTES + 1 - len(body)))
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        assert info_names(read_checkpoint_records(str(tmp_path))) == ["b-epoch-info.json"]
    assert f"{MAX_EPOCH_INFO_BYTES + 1} bytes, more than the {MAX_EPOCH_INFO_BYTES}" in warnings_of(caplog)[0]


def test_a_huge_epoch_info_is_refused_by_its_size_without_being_parsed(tmp_path, caplog, monkeypatch):
    write_checkpoint(tmp_path, "a", {"score": 1.0})
    size = 256 << 20  # 256 MiB (sparse: nothing on disk); the same path refuses many GB, by size alone
    with open(tmp_path / "b-epoch-info.json", "wb") as file:
        file.truncate(size)
    loads = json.loads

    def small_loads_only(text, *args, **kwargs):
        assert len(text) <= MAX_EPOCH_INFO_BYTES, "a file over the cap was parsed"
        return loads(text, *args, **kwargs)

    monkeypatch.setattr(json, "loads", small_loads_only)
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        assert info_names(read_checkpoint_records(str(tmp_path))) == ["a-epoch-info.json"]
    assert f"b-epoch-info.json: {size} bytes, more than the {MAX_EPOCH_INFO_BYTES}" in warnings_of(caplog)[0]


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_an_epoch_info_that_is_not_a_regular_file_is_skipped_without_blocking(tmp_path, caplog, kind):
    write_checkpoint(tmp_path, "a", {"score": 1.0})
    special = tmp_path / "b-epoch-info.json"
    os.mkfifo(special) if kind == "fifo" else special.mkdir()
    result = {}
    # a FIFO opened for reading blocks until a writer comes: run in a thread so a regression fails instead of hanging
    reader = threading.Thread(target=lambda: result.update(records=read_checkpoint_records(str(tmp_path))), daemon=True)
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        reader.start()
        reader.join(timeout=60)
    assert not reader.is_alive(), "reading the folder blocked on the FIFO"
    assert info_names(result["records"]) == ["a-epoch-info.json"]
    assert "b-epoch-info.json: not a regular file" in warnings_of(caplog)[0]


# params_path outside the folder


def outside_cases(tmp_path):
    """``name -> params_path`` for each way out of ``tmp_path / 'run'``, the file being real and readable."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run" / "sub").mkdir()
    save_params(str(elsewhere / "x.params"), {"w": mx.nd.array([7.0])})
    os.symlink(elsewhere / "x.params", tmp_path / "run" / "link.params")
    return {
        "absolute elsewhere": str(elsewhere / "x.params"),
        "dot-dot": "../elsewhere/x.params",
        "dot-dot inside a name": "sub/../../elsewhere/x.params",
        "symlink escaping": "link.params",
    }


@pytest.mark.parametrize("case", ["absolute elsewhere", "dot-dot", "dot-dot inside a name", "symlink escaping"])
def test_params_path_outside_the_folder_is_refused_unless_allowed(tmp_path, caplog, case):
    run = tmp_path / "run"
    run.mkdir()
    write_checkpoint(run, "a", {"score": 1.0})
    params_path = outside_cases(tmp_path)[case]
    save_epoch_info(str(run / "b"), {"params_path": params_path, "score": 0.5})
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        assert info_names(read_checkpoint_records(str(run))) == ["a-epoch-info.json"]
    (warning,) = warnings_of(caplog)
    assert warning.startswith(
        f"skipping 1 of the epoch-info files in {run}: b-epoch-info.json: 'params_path' {params_path!r}"
    )
    assert f"resolves to {tmp_path / 'elsewhere' / 'x.params'}, outside the folder" in warning
    assert "allow_outside_folder=True" in warning
    records = read_checkpoint_records(str(run), allow_outside_folder=True)
    assert info_names(records) == ["a-epoch-info.json", "b-epoch-info.json"]
    assert load_params(records[1]["params_path"])["w"].asscalar() == 7.0


def test_absolute_params_paths_inside_the_folder_are_accepted_as_gluonts_writes_them(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "alias")  # the folder read through another name: still inside
    params_path = write_checkpoint(real, "epoch-0000", {"score": 1.0})
    save_epoch_info(str(real / "epoch-0000"), {"params_path": params_path, "epoch_no": 0, "score": 1.0})
    os.mkdir(real / "sub")
    save_params(str(real / "sub" / "b.params"), {"w": mx.nd.array([2.0])})
    save_epoch_info(str(real / "b"), {"params_path": "sub/./b.params", "score": 2.0})
    for folder in (real, tmp_path / "alias"):
        records = read_checkpoint_records(str(folder))
        assert [os.path.realpath(record["params_path"]) for record in records] == [
            str(real / "sub" / "b.params"),
            params_path,
        ]


def test_two_records_of_one_params_file_count_once(tmp_path, caplog):
    write_checkpoint(tmp_path, "epoch-0000", {"epoch_no": 0, "score": 1.0})
    save_epoch_info(str(tmp_path / "epoch-0000-copy"), {"params_path": "./epoch-0000.params", "score": 0.1})
    with caplog.at_level(logging.WARNING, logger="modavg_plugin"):
        assert info_names(read_checkpoint_records(str(tmp_path))) == ["epoch-0000-copy-epoch-info.json"]
    assert (
        "epoch-0000-epoch-info.json: names the same parameter file as epoch-0000-copy-epoch-info.json"
        in (warnings_of(caplog)[0])
    )


# weights


@pytest.mark.parametrize(
    "weights, count, message",
    [
        ([0.5], 2, "got 1 weights for 2 items"),
        ([0.5, math.nan], 2, "weight 1 must be finite and >= 0, got nan"),
        ([math.inf, 1.0], 2, "weight 0 must be finite and >= 0, got inf"),
        ([1.0, -0.1], 2, "weight 1 must be finite and >= 0, got -0.1"),
        ([10**400, 1.0], 2, "weight 0 must be finite and >= 0"),
        ([True, 1.0], 2, "weight 0 must be a real number, got True (bool)"),
        (["0.5", 0.5], 2, "weight 0 must be a real number, got '0.5' (str)"),
        ([None], 1, "weight 0 must be a real number, got None (NoneType)"),
        ([0.0, 0], 2, "weights must not all be 0"),
    ],
)
def test_check_weights_names_the_offending_weight(weights, count, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_weights(weights, count)


def test_normalised_weights_survive_huge_and_tiny_weights():
    assert normalised_weights([1e308, 1e308, 0.0], 3) == [0.5, 0.5, 0.0]  # their sum overflows
    assert normalised_weights([5e-324, 5e-324], 2) == [0.5, 0.5]  # subnormal
    assert normalised_weights([np.float32(1.0), 3], 2) == [0.25, 0.75]
    averaged = average_arrays([mx.nd.array([1.0]), mx.nd.array([3.0])], [1e308, 1e308])
    assert averaged.asscalar() == 2.0


def test_a_folder_that_is_a_file_or_cannot_be_listed_is_named(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match=f"checkpoint folder {tmp_path / 'file'} is not a folder"):
        read_checkpoint_records(str(tmp_path / "file"))

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "listdir", refuse)
    with pytest.raises(CheckpointError, match=rf"checkpoint folder {tmp_path} cannot be listed \(Permission denied\)"):
        read_checkpoint_records(str(tmp_path))


def test_files_are_written_with_the_mode_open_would_give(tmp_path):
    from modavg_plugin.files import write_atomically

    umask = os.umask(0o022)
    os.umask(umask)
    path = tmp_path / "x.json"
    write_atomically(str(path), lambda temporary: open(temporary, "w").close())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def test_load_weights_matches_names_saved_relative_to_another_prefix(tmp_path):
    from modavg_plugin import load_weights

    source = mx.gluon.nn.HybridSequential(prefix="training0_")
    with source.name_scope():
        source.add(mx.gluon.nn.Dense(3, in_units=2), mx.gluon.nn.Dense(1, in_units=3))
    source.initialize(mx.init.Uniform(1.0))
    path = str(tmp_path / "relative.params")
    mx.nd.save(path, {name[len("training0_") :]: p.data() for name, p in source.collect_params().items()})
    target = mx.gluon.nn.HybridSequential(prefix="predictor7_")
    with target.name_scope():
        target.add(mx.gluon.nn.Dense(3, in_units=2), mx.gluon.nn.Dense(1, in_units=3))
    target.initialize(mx.init.Zero(), ctx=[mx.cpu(0), mx.cpu(1)])
    load_weights(target, path)
    for (_, expected), (_, parameter) in zip(source.collect_params().items(), target.collect_params().items()):
        for copy in parameter.list_data():
            np.testing.assert_array_equal(copy.asnumpy(), expected.data().asnumpy())
    extra = dict(mx.nd.load(path), dense9_bias=mx.nd.zeros(1))
    with pytest.raises(CheckpointError, match="array 'dense9_bias' matches no parameter"):
        load_weights(target, extra)
    missing = {name: value for name, value in mx.nd.load(path).items() if name != "dense1_bias"}
    with pytest.raises(CheckpointError, match="has no array for parameter 'predictor7_dense1_bias'"):
        load_weights(target, missing)
