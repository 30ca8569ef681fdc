#!/usr/bin/env python
"""``python tools/curate/run.py <stage> ...``: the same CLI as ``python -m tools.curate``."""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# Running this file puts tools/curate/ first on sys.path, where module names such as
# export.py would shadow others; the repository root is what the package needs.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

from tools.curate.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(configure_logging=True))
