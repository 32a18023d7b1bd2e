"""``python -m modavg_plugin``: the ``modavg`` command (see :mod:`modavg_plugin.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
