"""``python -m danlu``: the ``danlu`` command line."""

import sys

from .bench.cli import main

sys.exit(main())
