"""A full disk, for real: a tmpfs of 2 MiB filled to many levels while the library writes into it.

``mx.nd.save`` ignores write errors when it closes its file, so a disk that
fills up can leave a ``.params`` file cut short without any exception. Here
a real tmpfs (mounted by a module fixture; the tests that need it are
skipped, with the reason, where mounting is refused) is filled with a
filler file so that the free space ends at chosen points of the file being
written: before its first byte, inside an array's header, inside the
values, inside the names at the end, or just after it. Then

1. ``modavg average a.params b.params -o TMPFS/avg.params`` (inputs outside
   the tmpfs) exits 1 with one ``modavg: error:`` line naming the output, no
   traceback, no ``.tmp-*`` left and an older ``avg.params`` byte-for-byte
   unchanged; or, when the result fits, writes the mean;
2. an :class:`AveragingRun` writing its checkpoints and state file into the
   tmpfs ends every epoch without an exception, warns naming the epoch and
   the error, keeps what it saved before (nothing pruned), keeps the state
   file whole or absent, and once space is freed resumes from the last
   whole state;
3. the same with post-hoc snapshots: every snapshot record names a whole
   file, and ``modavg posthoc`` on them works or fails with one line;
4. a real GluonTS training with ``ExponentialAveragingCallback`` on a
   (nearly) full tmpfs completes and returns its predictor, with warnings.

A tmpfs allocates whole pages, so a file being written stops exactly at the
free space (a multiple of the page size): the filler places the cut. Where
each cut fell is computed here from the ``.params`` layout (MXNet 1.x dense
arrays, parsed independently of the library) and printed (``pytest -s``).
Whether a file that reached the disk is whole is also judged here, by that
parser and by ``mx.nd.load``, never by the library's own check.
"""

import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from modavg_plugin import AveragingRun, ExponentialAveragingCallback
from modavg_plugin.cli import main
from modavg_plugin.files import read_state_file

from conftest import dataset, seed_everything, tiny_estimator

MOUNT_SIZE = "2m"
LIST_MAGIC, ARRAY_MAGIC = 0x112, 0xF993FAC9
ITEMSIZES = {0: 4, 1: 8, 2: 2, 3: 1, 4: 4, 5: 1, 6: 8, 7: 1}  # MXNet dtype flag -> bytes per value
MXNET_ERROR, CHECKED_ON_DISK = "FileStream.Write incomplete", "only part of the file reached the disk"
STATE_NAME = "averaging-state.params"
PARTS = ("header", "values", "names")

Arrays = Dict[str, np.ndarray]
Entry = Tuple[str, Tuple[int, ...], int]  # an array in a .params file: name, shape, bytes per value


# The disk ---------------------------------------------------------------------------------------


class Disk:
    """A mounted tmpfs, and a filler file that leaves an exact number of pages free."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.page = os.statvfs(root).f_frsize
        self.filler = os.path.join(root, "filler")

    def free(self) -> int:
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def clear(self) -> None:
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)

    def fill_to(self, pages: Optional[int]) -> None:
        """Leave exactly ``pages`` pages free (``None``: no filler)."""
        self.unfill()
        if pages is None:
            return
        assert self.free() >= pages * self.page, f"cannot leave {pages} pages free: only {self.free()} bytes are"
        with open(self.filler, "wb") as filler:
            filler.write(bytes(self.free() - pages * self.page))
        assert self.free() == pages * self.page

    def unfill(self) -> None:
        if os.path.exists(self.filler):
            os.remove(self.filler)

    def leftovers(self) -> List[str]:
        """Every ``.tmp-*`` file anywhere on the disk."""
        return sorted(
            os.path.join(folder, name)
            for folder, _, names in os.walk(self.root)
            for name in names
            if name.startswith(".tmp-")
        )


@pytest.fixture(scope="module")
def mounted(tmp_path_factory) -> Iterator[Disk]:
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs Linux and mount(8)")
    root = str(tmp_path_factory.mktemp("tmpfs"))
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={MOUNT_SIZE}", "tmpfs", root], capture_output=True, text=True
    )
    if mount.returncode != 0:
        reason = mount.stderr.strip() or f"exit status {mount.returncode}"
        pytest.skip(f"cannot mount a {MOUNT_SIZE} tmpfs (root with CAP_SYS_ADMIN needed): {reason}")
    try:
        yield Disk(root)
    finally:
        if subprocess.run(["umount", root], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", root], capture_output=True)


@pytest.fixture
def disk(mounted: Disk) -> Iterator[Disk]:
    mounted.clear()
    yield mounted
    mounted.clear()


# The .params layout, independently of the library ------------------------------------------------


def regions(entries: Sequence[Entry]) -> List[Tuple[int, int, str]]:
    """``(start, end, part)`` of each part of the file ``mx.nd.save`` writes for ``entries``.

    Parts: ``header`` (the list header and each array's), ``values``, ``names`` (their count, then each name).
    """
    parts, position = [(0, 24, "header")], 24
    for _, shape, itemsize in entries:
        header = 12 + 8 * len(shape) + 12  # magic, storage type, ndim; dims; device type, device id, dtype flag
        parts.append((position, position + header, "header"))
        position += header
        size = math.prod(shape) * itemsize
        if size:
            parts.append((position, position + size, "values"))
            position += size
    parts.append((position, position + 8 + sum(8 + len(name.encode()) for name, _, _ in entries), "names"))
    return parts


def file_size(entries: Sequence[Entry]) -> int:
    return regions(entries)[-1][1]


def part_at(entries: Sequence[Entry], offset: int) -> str:
    """The part holding byte ``offset``, the first one that did not reach the disk; ``whole`` past the end."""
    return next((part for start, end, part in regions(entries) if start <= offset < end), "whole")


def boundaries_by_part(entries: Sequence[Entry], page: int) -> Dict[str, List[int]]:
    """The page boundaries inside the file (in pages), by the part they cut."""
    found: Dict[str, List[int]] = {part: [] for part in PARTS}
    for boundary in range(page, file_size(entries), page):
        found[part_at(entries, boundary)].append(boundary // page)
    return found


def entries_of(arrays: Mapping[str, mx.nd.NDArray]) -> List[Entry]:
    return [(name, tuple(value.shape), np.dtype(value.dtype).itemsize) for name, value in arrays.items()]


def whole_params(path: str) -> Arrays:
    """The arrays of ``path``, after walking every header against the file's size here and loading it with MXNet."""
    with open(path, "rb") as file:
        data = file.read()
    position = 0

    def take(count: int) -> bytes:
        nonlocal position
        assert position + count <= len(data), f"{path} is cut short: {len(data)} bytes, needs {position + count}"
        position += count
        return data[position - count : position]

    def number(layout: str) -> int:
        return int(np.frombuffer(take(np.dtype(layout).itemsize), dtype=layout)[0])

    assert number("<u8") == LIST_MAGIC, f"{path} is not a .params file"
    number("<u8")
    count = number("<u8")
    for _ in range(count):
        assert (number("<u4"), number("<i4")) == (ARRAY_MAGIC, 0), f"{path}: not a dense MXNet 1.x array"
        shape = [number("<i8") for _ in range(number("<i4"))]
        take(8)  # device type and id
        take(math.prod(shape) * ITEMSIZES[number("<i4")])
    assert number("<u8") == count, f"{path}: another number of names than of arrays"
    for _ in range(count):
        take(number("<u8"))
    assert position == len(data), f"{path}: {len(data) - position} bytes after the last name"
    return {name: value.asnumpy() for name, value in mx.nd.load(path).items()}


def digest(path: str) -> Optional[str]:
    if not os.path.exists(path):
        return None
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


LONG_NAME = "a_rather_long_parameter_name_" * 12  # long names: they fill several pages at the end of a file


def designed_lengths(page: int, big_pages: Sequence[int], header_cuts: Sequence[int], small: int) -> List[int]:
    """Lengths of 1-D float32 arrays whose file has big array ``k + 1``'s header ``header_cuts[k]`` bytes before a page boundary.

    So a disk ending at that boundary cuts that header; ``small`` small arrays follow.
    """
    lengths, header = [], 24
    for index, pages in enumerate(big_pages):
        values = header + 32  # a 1-D array's header is 32 bytes
        cut = header_cuts[index] if index < len(header_cuts) else page // 2
        lengths.append(((values // page + pages + 1) * page - cut - values) // 4)
        header = values + 4 * lengths[-1]
    return lengths + [1 + index % 13 for index in range(small)]


def how_reported(message: str) -> str:
    if MXNET_ERROR in message:
        return "MXNet's error"
    if CHECKED_ON_DISK in message:
        return "checked on disk"
    return "No space left (Python)" if "No space left on device" in message else "other"


def run_command(capsys, arguments: Sequence[str]) -> Tuple[int, str, str]:
    capsys.readouterr()
    status = main(list(arguments))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def warnings_of(caplog, text: str) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


# 1. The command ---------------------------------------------------------------------------------

BIG_ARRAY_PAGES = (30, 25, 35, 30, 25, 30, 30, 20)  # about 0.9 MiB of float32: an older avg.params and a new one fit
HEADER_CUTS = (16, 4, 28, 0, 12, 24, 8)  # where the boundary falls in the header of big arrays 1..7


def command_inputs(page: int, seed: int) -> Arrays:
    rng = np.random.RandomState(seed)
    lengths = designed_lengths(page, BIG_ARRAY_PAGES, HEADER_CUTS, small=40)
    return {
        f"layer{index:02d}.{LONG_NAME}": rng.randn(length).astype(np.float32) for index, length in enumerate(lengths)
    }


def save_arrays(path: str, arrays: Arrays) -> str:
    mx.nd.save(path, {name: mx.nd.array(value, dtype=value.dtype) for name, value in arrays.items()})
    return path


def command_levels(entries: Sequence[Entry], page: int) -> List[int]:
    """Free pages: none; at each cut header; in the middle of every other big array; at each boundary in the names; just enough."""
    found = boundaries_by_part(entries, page)
    values = [start // page + (end - start) // page // 2 for start, end, part in regions(entries) if part == "values"]
    return sorted(
        {0, *found["header"], *values[: len(BIG_ARRAY_PAGES) : 2], *found["names"]}
        | {math.ceil(file_size(entries) / page)}
    )


def test_modavg_average_into_a_full_disk_fails_in_one_line_and_keeps_the_older_file(disk, tmp_path, capsys):
    inputs = [command_inputs(disk.page, seed) for seed in (1, 2)]
    paths = [save_arrays(str(tmp_path / f"{name}.params"), arrays) for name, arrays in zip("ab", inputs)]
    older = save_arrays(str(tmp_path / "older.params"), command_inputs(disk.page, 3))  # an earlier good result
    mean = {name: (inputs[0][name].astype(np.float64) + inputs[1][name]) / 2 for name in inputs[0]}
    entries = [(name, value.shape, 4) for name, value in inputs[0].items()]
    size = file_size(entries)
    assert os.path.getsize(paths[0]) == size  # the layout computed here is MXNet's
    output = os.path.join(disk.root, "avg.params")

    outcomes: Counter = Counter()
    unnamed: List[str] = []  # error lines that do not name the output
    for pages in [*command_levels(entries, disk.page), None]:
        for with_older in (False, True):
            disk.clear()
            if with_older:
                shutil.copyfile(older, output)
            before = digest(output)
            disk.fill_to(pages)
            status, out, err = run_command(capsys, ["average", *paths, "-o", output])
            level = f"{pages} pages free, {'an older' if with_older else 'no'} avg.params"
            assert not disk.leftovers(), level
            if pages is None or pages * disk.page >= size:  # it fits
                assert (status, out.strip(), err) == (0, output, ""), level
                loaded = whole_params(output)
                assert list(loaded) == list(mean), level
                for name, value in mean.items():
                    assert_allclose(loaded[name], value, rtol=1e-6, atol=1e-7, err_msg=f"{level}: {name}")
                outcomes["fits"] += 1
                continue
            lines = err.splitlines()
            assert (status, out) == (1, ""), f"{level}: {err}"
            assert len(lines) == 1 and lines[0].startswith("modavg: error: "), f"{level}: {err}"
            assert "Traceback" not in err, level
            assert digest(output) == before, f"{level}: the output changed"
            if with_older:
                whole_params(output)  # and it still loads
            if output not in lines[0]:
                unnamed.append(f"{level}: {lines[0]}")
            outcomes[(part_at(entries, pages * disk.page), how_reported(lines[0]))] += 1
    print("\nmodavg average, by where the disk ended (pairs of runs, with and without an older file):", dict(outcomes))
    assert outcomes["fits"] == 4  # just enough and all free, each with and without an older file
    for part in PARTS:
        assert sum(n for key, n in outcomes.items() if key[0] == part) >= 4, f"no cut in the {part}: {outcomes}"
    assert not unnamed, f"{len(unnamed)} error lines do not name {output}, e.g. {unnamed[0]}"


def test_the_real_command_exits_1_with_one_line_when_the_names_do_not_fit(disk, tmp_path):
    """In a process of its own, the silent case: the names are buffered, then lost when MXNet closes the file."""
    inputs = [command_inputs(disk.page, seed) for seed in (1, 2)]
    paths = [save_arrays(str(tmp_path / f"{name}.params"), arrays) for name, arrays in zip("ab", inputs)]
    entries = [(name, value.shape, 4) for name, value in inputs[0].items()]
    output = os.path.join(disk.root, "avg.params")
    shutil.copyfile(paths[1], output)  # an older good file
    before = digest(output)
    pages = file_size(entries) // disk.page  # all but the last page, which is in the names
    assert part_at(entries, pages * disk.page) == "names"
    disk.fill_to(pages)
    command = [sys.executable, "-m", "modavg_plugin", "average", *paths, "-o", output]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("modavg: error: "), done.stderr
    assert digest(output) == before and not disk.leftovers()
    whole_params(output)
    assert output in done.stderr, f"the error does not name {output}: {done.stderr}"


# 2-3. Training with the engine -----------------------------------------------------------------

SCORES = (3.0, 2.0, 4.0, 1.5)  # the mean of the best 3: epoch 3's success prunes epoch 2
RESUMED_EPOCHS = 2
STEPS_PER_EPOCH = 2
TARGETED_EPOCHS = (0, 1)  # the writes of these epochs get a cut in each part (the first into an empty folder)


def parameter_shapes(page: int, posthoc: bool) -> Dict[str, Tuple[int, ...]]:
    """About 50 pages a checkpoint and 100 a state file (33 and 100 with post-hoc snapshots), with cut headers and names over two pages.

    A state file holds the raw weights and the averages, and replacing it
    needs room for two: so the model is small enough for a few epochs to fit 2 MiB.
    """
    pages = 8 if posthoc else 12
    lengths = designed_lengths(page, (pages,) * 4, (16, 4, 28), small=12)
    return {f"block{index:02d}.{LONG_NAME}": (length,) for index, length in enumerate(lengths)}


class Host:
    """Named float32 Parameters, and a stand-in optimiser: after step ``k`` they hold :meth:`raw_at` ``(k)``."""

    def __init__(self, shapes: Mapping[str, Tuple[int, ...]]) -> None:
        self.shapes = dict(shapes)
        self.parameters: Dict[str, mx.gluon.Parameter] = {}
        for name, shape in self.shapes.items():
            self.parameters[name] = mx.gluon.Parameter(name, shape=shape, dtype="float32")
            self.parameters[name].initialize(ctx=mx.cpu())
        self.write(self.raw_at(0))

    def raw_at(self, step: int) -> Arrays:
        return {
            name: np.sin(0.37 * step + index + 1e-3 * np.arange(math.prod(shape))).reshape(shape).astype(np.float32)
            for index, (name, shape) in enumerate(self.shapes.items())
        }

    def write(self, arrays: Mapping[str, np.ndarray]) -> None:
        for name, value in arrays.items():
            self.parameters[name].data()[:] = np.asarray(value, dtype=np.float32)


@dataclass
class Write:
    """One ``mx.nd.save`` the library made: of which file, in which epoch, its arrays, the free space when it began."""

    name: str
    epoch: int
    entries: List[Entry]
    free: int

    @property
    def kind(self) -> str:
        if self.name.startswith("epoch-"):
            return "checkpoint"
        return "state" if self.name == STATE_NAME else "snapshot"

    @property
    def part(self) -> str:
        """Where the disk ended in this file; ``whole`` if it fit."""
        return part_at(self.entries, self.free)


@dataclass
class WriteLog:
    writes: List[Write] = field(default_factory=list)
    epoch: int = -1
    reported: Counter = field(default_factory=Counter)  # the failures' warnings, by the error they give


@pytest.fixture
def write_log(disk, monkeypatch) -> WriteLog:
    """Records each ``mx.nd.save`` into the tmpfs and the free space before it; the save itself is MXNet's."""
    log, real_save = WriteLog(), mx.nd.save

    def observed_save(fname, data):
        if isinstance(data, dict) and os.path.abspath(fname).startswith(disk.root + os.sep):
            name = os.path.basename(fname).split("-", 2)[-1]  # .tmp-XXXXXXXX-NAME
            log.writes.append(Write(name, log.epoch, entries_of(data), disk.free()))
        return real_save(fname, data)

    monkeypatch.setattr(mx.nd, "save", observed_save)
    return log


def run_options(folder: str, posthoc: bool, resume: bool = False) -> dict:
    options = dict(average={"type": "exponential", "decay": 0.9}, avg_strategy={"type": "mean", "num_models": 3})
    if posthoc:
        options["posthoc"] = {"sigma_rels": [0.05], "every_epochs": 1}
    return dict(options, checkpoint_dir=folder, resume=resume)


def check_folder(folder: str, where: str) -> None:
    """Every ``.params`` file there is whole, the state file readable, every post-hoc record names a whole file."""
    assert not [name for _, _, names in os.walk(folder) for name in names if name.startswith(".tmp-")], where
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if name.endswith(".params"):
                whole_params(path)
            if name == STATE_NAME:
                read_state_file(path)
            if name.endswith("-posthoc-info.json"):
                with open(path, encoding="utf-8") as file:
                    whole_params(os.path.join(root, json.load(file)["params_path"]))


@dataclass
class Seen:
    """What the test saw of a run."""

    saved: Dict[int, Arrays] = field(default_factory=dict)  # epoch -> what its checkpoint must hold
    raw: Dict[int, Arrays] = field(default_factory=dict)  # epochs done -> the raw weights then
    averaged: Dict[int, Arrays] = field(default_factory=dict)  # epochs done -> the moving average then
    last_state: int = 0  # epochs done in the last state saved whole


def train_and_check(run: AveragingRun, host: Host, epochs: range, seen: Seen, caplog, log: WriteLog, level: str):
    """End each epoch as a host does, then check what reached the disk."""
    folder = run.checkpoint_dir
    state_path = os.path.join(folder, STATE_NAME)
    for epoch in epochs:
        for batch in range(STEPS_PER_EPOCH):
            host.write(host.raw_at(epoch * STEPS_PER_EPOCH + batch + 1))
            run.step()
        seen.raw[epoch + 1] = host.raw_at((epoch + 1) * STEPS_PER_EPOCH)
        weights = {name: value.asnumpy() for name, value in run.epoch_weights().items()}  # all are averaged
        seen.averaged[epoch + 1] = weights
        kept_before = {record["params_path"] for record in run.checkpoints.records}
        state_before = digest(state_path)
        caplog.clear()
        first_write, log.epoch = len(log.writes), epoch
        where = f"{level}, epoch {epoch}"

        path = run.end_epoch(score=SCORES[epoch % len(SCORES)])  # never raises, whatever the disk

        failed = warnings_of(caplog, f"could not save the checkpoint of epoch {epoch} in {folder} (")
        failed_state = warnings_of(caplog, f"could not save the averaging state in {folder} (")
        failed_snapshots = warnings_of(caplog, "could not save post-hoc EMA snapshots at step")
        log.reported.update(how_reported(message) for message in failed + failed_state + failed_snapshots)
        assert len(warnings_of(caplog, "could not")) == len(failed + failed_state + failed_snapshots), caplog.text
        for write in log.writes[first_write:]:
            warned = {"checkpoint": failed, "state": failed_state, "snapshot": failed_snapshots}[write.kind]
            assert write.part == "whole" or warned, f"{where}: {write.name} did not fit and nothing was said"
        if failed:
            assert path is None and len(failed) == 1, where
            assert re.search(r"\(\[Errno \d+\] .+\); training goes on", failed[0]), failed[0]
            assert kept_before <= {record["params_path"] for record in run.checkpoints.records}, f"{where}: pruned"
            assert not os.path.exists(os.path.join(folder, f"epoch-{epoch:04d}.params")), where
        else:
            assert path == os.path.join(folder, f"epoch-{epoch:04d}.params"), where
            seen.saved[epoch] = weights
        for record in run.checkpoints.records:  # the kept checkpoints are there, whole, holding what was saved
            loaded = whole_params(record["params_path"])
            for name, value in seen.saved[record["epoch_no"]].items():
                assert_array_equal(loaded[name], value, err_msg=f"{where}: epoch {record['epoch_no']}, {name}")
        if failed_state:
            assert digest(state_path) == state_before, f"{where}: a failed state save changed the state file"
        else:
            seen.last_state = epoch + 1
        if seen.last_state:
            state, arrays, _ = read_state_file(state_path)
            assert state["epochs_done"] == seen.last_state, where
            for name, value in seen.raw[seen.last_state].items():  # one epoch's counters, raw weights and averages
                assert_array_equal(arrays[f"raw:{name}"].asnumpy(), value, err_msg=where)
                assert_array_equal(arrays[f"average:{name}"].asnumpy(), seen.averaged[seen.last_state][name], where)
        else:
            assert not os.path.exists(state_path), where
        check_folder(folder, where)


def started_run(disk: Disk, posthoc: bool, resume: bool = False) -> Tuple[AveragingRun, Host]:
    run, host = (
        AveragingRun(**run_options(os.path.join(disk.root, "run"), posthoc, resume)),
        Host(parameter_shapes(disk.page, posthoc)),
    )
    return run, host


def targeted_levels(disk: Disk, posthoc: bool, log: WriteLog, caplog) -> List[int]:
    """Free pages (once the run has started) that end the disk before, in a header, in the values, in the names, and just after each write of ``TARGETED_EPOCHS``.

    A dry run on the empty disk records each write's free space; leaving
    ``L`` pages free instead lowers every write's free space by the same
    amount, so a write that began with ``F`` bytes free then begins with
    ``F - (initial - L)`` (while the writes before it still fit).
    """
    disk.clear()
    run, host = started_run(disk, posthoc)
    run.start(host.parameters.items())
    initial = disk.free()
    log.writes.clear()
    train_and_check(run, host, range(len(SCORES)), Seen(), caplog, log, "dry run")
    run.checkpoints.close()
    targeted = [write for write in log.writes if write.epoch in TARGETED_EPOCHS]
    assert targeted and all(write.part == "whole" for write in targeted), "the dry run does not fit the empty disk"
    levels = set()
    for write in targeted:
        found = boundaries_by_part(write.entries, disk.page)
        cuts = [0, *found["header"][:1], *found["values"][len(found["values"]) // 2 :][:1], *found["names"][-1:]]
        cuts.append(math.ceil(file_size(write.entries) / disk.page))
        levels.update((initial - write.free) // disk.page + cut for cut in cuts)
    return sorted(level for level in levels if 0 <= level <= initial // disk.page)


@pytest.mark.parametrize("posthoc", [False, True], ids=["checkpoints-and-state", "with-posthoc-snapshots"])
def test_training_on_a_filling_disk_goes_on_keeps_whole_files_and_resumes(
    disk, write_log, caplog, capsys, tmp_path, posthoc
):
    caplog.set_level(logging.WARNING, logger="modavg_plugin")
    levels = targeted_levels(disk, posthoc, write_log, caplog)
    parts: Counter = Counter()  # every write into the tmpfs, by where the disk ended in it
    first_cuts: Counter = Counter()  # each level's first write that did not fit
    resumed_levels = 0
    for pages in levels:
        disk.clear()
        run, host = started_run(disk, posthoc)
        run.start(host.parameters.items())  # the folder and its lock exist before the disk fills
        disk.fill_to(pages)
        write_log.writes.clear()
        seen, level = Seen(), f"{pages} pages free"
        train_and_check(run, host, range(len(SCORES)), seen, caplog, write_log, level)
        parts.update((write.kind, write.part) for write in write_log.writes)
        first_cut = next(((w.kind, w.epoch, w.part) for w in write_log.writes if w.part != "whole"), "all fit")
        first_cuts.update([first_cut])
        run.checkpoints.close()  # as a killed process would: the folder's lock goes

        if posthoc:  # the snapshots left by the full disk rebuild an EMA, or the command says why not in one line
            rebuilt = str(tmp_path / "rebuilt.params")
            snapshots = os.path.join(run.checkpoint_dir, "posthoc")
            status, out, err = run_command(capsys, ["posthoc", snapshots, "--sigma-rel", "0.05", "-o", rebuilt])
            if status == 0:
                assert sorted(whole_params(rebuilt)) == sorted(host.shapes), level
            else:
                assert status == 1 and len(err.splitlines()) == 1 and err.startswith("modavg: error: "), err

        disk.unfill()
        if not seen.last_state:
            continue  # no state reached the disk: nothing to resume from
        resumed_levels += 1
        run, host = started_run(disk, posthoc, resume=True)
        resumed = run.resume()
        assert resumed is not None and run.epochs_done == seen.last_state, level
        for name, value in seen.raw[seen.last_state].items():
            assert_array_equal(resumed.raw[name].asnumpy(), value, err_msg=level)
        host.write({name: value.asnumpy() for name, value in resumed.raw.items()})
        run.start(host.parameters.items())
        more = range(seen.last_state, seen.last_state + RESUMED_EPOCHS)
        train_and_check(run, host, more, seen, caplog, write_log, f"{level}, resumed")
        assert seen.last_state == run.epochs_done
        if not posthoc:  # with snapshots piling up, 2 MiB is too small for 6 epochs even when empty
            assert not warnings_of(caplog, "could not"), f"{level}: the freed disk still fails"
        run.checkpoints.close()
    print(f"\n{len(levels)} levels; the first write that did not fit:", dict(first_cuts))
    print("all writes by where the disk ended:", dict(sorted(parts.items())))
    print("failures by the error reported:", dict(write_log.reported), f"; resumed after {resumed_levels} levels")
    assert len(levels) >= 15 and resumed_levels >= len(levels) // 3
    for kind in ("checkpoint", "state", "snapshot") if posthoc else ("checkpoint", "state"):
        for part in (*PARTS, "whole"):
            assert parts[(kind, part)], f"no {kind} write ended in its {part}: {parts}"


def test_a_run_started_on_a_full_disk_warns_and_goes_on(disk, caplog):
    """Even the folder's lock file cannot be written: a warning, not an exception."""
    caplog.set_level(logging.WARNING, logger="modavg_plugin")
    disk.fill_to(0)
    run, host = started_run(disk, posthoc=False)
    run.start(host.parameters.items())
    for epoch in range(2):
        run.step()
        assert run.end_epoch(score=1.0) is None
        assert warnings_of(caplog, f"could not save the checkpoint of epoch {epoch} ")
    assert not disk.leftovers()


# 4. A real GluonTS training ----------------------------------------------------------------------


@pytest.mark.parametrize("pages", [0, 1, 2, 3])
def test_gluonts_training_on_a_full_disk_completes_with_warnings(disk, caplog, pages):
    caplog.set_level(logging.WARNING, logger="modavg_plugin")
    folder = os.path.join(disk.root, "gluonts")
    disk.fill_to(pages)
    callback = ExponentialAveragingCallback(decay=0.9, checkpoint_dir=folder)
    seed_everything()
    predictor = tiny_estimator([callback], epochs=3, batches=2).train(dataset(), validation_data=dataset())
    forecast = next(iter(predictor.predict(dataset())))
    assert np.all(np.isfinite(forecast.mean))
    assert callback.run.epochs_done == 3
    assert warnings_of(caplog, "could not save"), caplog.text
    check_folder(folder, f"{pages} pages free")
    assert not disk.leftovers()


# Without a tmpfs: a checkpoint folder that cannot be created -------------------------------------


@pytest.mark.parametrize("host", ["engine", "gluonts"])
def test_a_checkpoint_folder_that_cannot_be_created_is_a_warning_at_the_epoch_end(tmp_path, caplog, host):
    caplog.set_level(logging.WARNING, logger="modavg_plugin")
    (tmp_path / "file").write_text("a file, not a folder")
    folder = str(tmp_path / "file" / "run")
    if host == "engine":
        run, network = AveragingRun({"type": "exponential", "decay": 0.9}, checkpoint_dir=folder), Host({"w": (3,)})
        run.start(network.parameters.items())
        for _ in range(2):
            run.step()
            assert run.end_epoch(score=1.0) is None
    else:
        callback = ExponentialAveragingCallback(decay=0.9, checkpoint_dir=folder)
        seed_everything()
        assert tiny_estimator([callback], epochs=2, batches=2).train(dataset()) is not None
    for epoch in range(2):
        assert warnings_of(caplog, f"could not save the checkpoint of epoch {epoch} in {folder}"), caplog.text
