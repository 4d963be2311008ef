"""``python -m dldr``: the ``dldr`` command, for environments where its script is not on PATH (Ray Jobs)."""

import sys

from dldr.cli import main

sys.exit(main())
