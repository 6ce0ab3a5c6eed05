"""Installs the test run's `notablescan` listener (tests/notablescan.py) in every Python
process the tests start: tests/conftest.py puts this directory on PYTHONPATH and sets
NOTABLESCAN_DIR, so a gateway started as a subprocess reports the reads no index serves.
Outside a test run (NOTABLESCAN_DIR unset), or in a Python without PyMongo, it does nothing.
It shadows the interpreter's own sitecustomize (on Debian, an apport crash hook) in those
processes only."""

import os
import sys
from pathlib import Path

if os.environ.get("NOTABLESCAN_DIR"):
    _tests = Path(__file__).resolve().parent.parent
    sys.path += [p for p in (str(_tests), str(_tests.parent)) if p not in sys.path]
    try:
        import notablescan
    except ImportError:  # a Python without PyMongo (e.g. the system python3 running scripts/)
        pass
    else:
        notablescan.install()
