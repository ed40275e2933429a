"""Every node parameter is documented in README and config/params.yaml, and the yaml loads."""
import re

import pytest

from locations import REPO_ROOT
import yaml

pytest.importorskip('rclpy')
from qwen_vl_perception.ros.parameters import PARAMETERS, settings_from_values  # noqa: E402

ROOT = REPO_ROOT


def test_readme_documents_every_parameter():
    readme = (ROOT / 'README.md').read_text()
    documented = set(re.findall(r'^\| `(\w+)`', readme, flags=re.MULTILINE))
    documented |= set(re.findall(r'^\| `\w+` / `(\w+)`', readme, flags=re.MULTILINE))
    missing = [spec.name for spec in PARAMETERS if spec.name not in documented]
    assert not missing, f'README lacks {missing}'


def test_params_yaml_names_only_real_parameters_and_builds_valid_settings():
    text = (ROOT / 'config' / 'params.yaml').read_text()
    (values,) = [node['ros__parameters'] for node in yaml.safe_load(text).values()]
    known = {spec.name for spec in PARAMETERS}
    assert set(values) <= known, set(values) - known
    mentioned = set(re.findall(r'^\s*#?\s*(\w+):', text, flags=re.MULTILINE))
    assert known <= mentioned, known - mentioned
    settings_from_values(values)
