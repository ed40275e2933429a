"""Where things are, for tests in any folder under test/ (conftest.py puts this folder on
sys.path, so helpers import by name: ``from waiting import wait_for``)."""
from pathlib import Path

SUPPORT_DIR = Path(__file__).resolve().parent
"""Helper modules and scripts the tests run in their own processes."""

DATA_DIR = SUPPORT_DIR / 'data'
"""Reference files written by the project's own code."""

REPO_ROOT = SUPPORT_DIR.parents[1]
