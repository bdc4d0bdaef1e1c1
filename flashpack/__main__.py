"""``python -m flashpack``: the command line (see :mod:`flashpack.cli`)."""

import sys

from .cli import main

sys.exit(main())
