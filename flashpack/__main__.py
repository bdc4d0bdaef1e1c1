"""``python -m flashpack``: the command line (see :mod:`flashpack.tools.cli`)."""

import sys

from .tools.cli import main

sys.exit(main())
