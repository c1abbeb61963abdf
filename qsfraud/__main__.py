"""``python -m qsfraud``: the same as the ``qsfraud`` command."""

import sys

from qsfraud.cli import main

sys.exit(main())
