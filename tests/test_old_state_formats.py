"""Runs stopped by the code of commit c7c6584 resume to the result that code resumed them to.

tests/fixtures/old_callback_state/ and old_module_state/ are folders as a killed
run left them (the resume state file, the kept epoch checkpoints with their
epoch-info records, the post-hoc snapshots), written by
tests/fixtures/make_old_state_fixtures.py with that commit's code, next to what
its resumed run ended with (expected_*.params; see tests/fixtures/README.md).
Each test copies a folder (never resumes in place), resumes it with the
generator's own resume functions (public API only, unchanged since that
commit), and compares.
"""

import os

import mxnet as mx
import pytest
from fixtures.make_old_state_fixtures import (
    ADDED_FILES,
    EXPECTED_FINAL,
    EXPECTED_POSTHOC,
    HERE,
    POSTHOC_SIGMA_REL,
    copy_of_fixture,
    folder_digest,
    resumed_callback_run,
    resumed_module_run,
)
from numpy.testing import assert_allclose

from modavg_plugin import reconstruct_posthoc


def assert_same_arrays(actual: dict, expected_path: str) -> None:
    expected = mx.nd.load(expected_path)
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert_allclose(actual[name].asnumpy(), value.asnumpy(), rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    "fixture, resume",
    [("old_callback_state", resumed_callback_run), ("old_module_state", resumed_module_run)],
    ids=["gluonts-callback", "module-fit"],
)
def test_a_run_stopped_by_the_old_code_resumes_to_the_old_result(tmp_path, fixture, resume):
    original = os.path.join(HERE, fixture)
    before = folder_digest(original)
    folder = copy_of_fixture(original, str(tmp_path / fixture))
    assert not set(ADDED_FILES) & set(os.listdir(folder))

    final = resume(folder)

    assert_same_arrays(final, os.path.join(original, EXPECTED_FINAL))
    posthoc, _ = reconstruct_posthoc(os.path.join(folder, "posthoc"), sigma_rel=POSTHOC_SIGMA_REL)
    assert_same_arrays(posthoc, os.path.join(original, EXPECTED_POSTHOC))
    assert folder_digest(original) == before  # the fixture itself is never touched
