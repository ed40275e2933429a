"""What colcon and rosdep see of the package: setup.py without warnings, package.xml's
dependencies."""
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from locations import REPO_ROOT

ROOT = REPO_ROOT

# Checked against ros/rosdistro (rosdep/python.yaml; humble, jazzy and kilted
# distribution.yaml) in 2026-12. A new dependency needs a rosdep key, or a place in the
# pip-only comment of package.xml and in tools/env/requirements.txt.
ROSDEP_KEYS = {'rclpy', 'rcl_interfaces', 'diagnostic_msgs', 'ament_index_python', 'sensor_msgs',
               'std_msgs', 'vision_msgs', 'cv_bridge', 'launch', 'launch_ros', 'python3-numpy',
               'python3-opencv', 'python3-pil', 'python3-yaml'}


def test_setup_py_runs_without_stderr_output():
    """colcon reports any stderr of setup.py ("1 package had stderr output"); setuptools
    >= 79 warns about unknown options such as tests_require."""
    result = subprocess.run([sys.executable, 'setup.py', '--name'], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'qwen_vl_perception'
    assert result.stderr == ''


def test_exec_depends_are_known_rosdep_keys_and_leave_rviz_out():
    root = ElementTree.parse(ROOT / 'package.xml').getroot()
    depends = {element.text for element in root.iter('exec_depend')}
    assert 'rviz2' not in depends  # headless robots: rviz:=true documents it as optional
    assert depends <= ROSDEP_KEYS, depends - ROSDEP_KEYS
