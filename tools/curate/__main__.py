"""``python -m tools.curate <stage> ...`` (run from the repository root)."""

import sys

from tools.curate.cli import main

sys.exit(main(configure_logging=True))
