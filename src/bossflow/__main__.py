"""``python -m bossflow``: the same as the ``bossflow`` command."""

import sys

from .cli import main

sys.exit(main())
