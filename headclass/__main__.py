"""``python -m headclass``: the same as the ``headclass`` command."""

import sys

from headclass.cli import main

sys.exit(main())
