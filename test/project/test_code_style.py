"""PEP 8 at 99 columns (flake8, as ament_flake8 checks on a robot) over everything we write."""
import subprocess
import sys

import pytest

from locations import REPO_ROOT

pytest.importorskip('flake8')
ROOT = REPO_ROOT


def test_flake8_is_clean():
    paths = ['qwen_vl_perception', 'tools', 'test', 'launch', 'results', 'setup.py']
    result = subprocess.run([sys.executable, '-m', 'flake8', *paths], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
