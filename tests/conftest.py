import logging
import os
import warnings

import pytest

warnings.filterwarnings("ignore", message="Using `json`-module")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True)
def quiet_gluonts():
    logging.getLogger("gluonts").setLevel(logging.WARNING)
    yield
