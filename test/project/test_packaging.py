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
               'std_msgs', 'vision_msgs', 'visualization_msgs', 'lifecycle_msgs', 'action_msgs',
               'cv_bridge', 'launch', 'launch_ros', 'python3-numpy', 'python3-opencv',
               'python3-pil', 'python3-yaml'}
INTERFACES = ROOT / 'interfaces' / 'qwen_vl_perception_interfaces'
# Packages of this repository: built by colcon in the same workspace, skipped by rosdep
# (--from-paths names their folders: README).
WORKSPACE_PACKAGES = {'qwen_vl_perception_interfaces'}
# The interface package's build and run dependencies (all released for Humble, Jazzy, Kilted).
INTERFACE_KEYS = {'ament_cmake', 'rosidl_default_generators', 'rosidl_default_runtime',
                  'action_msgs', 'sensor_msgs', 'vision_msgs'}


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
    assert depends <= ROSDEP_KEYS | WORKSPACE_PACKAGES, depends - ROSDEP_KEYS


def test_interface_package_is_an_ament_cmake_interface_package_of_known_keys():
    root = ElementTree.parse(INTERFACES / 'package.xml').getroot()
    assert root.findtext('name') == 'qwen_vl_perception_interfaces'
    assert root.find('export').findtext('build_type') == 'ament_cmake'
    assert root.findtext('member_of_group') == 'rosidl_interface_packages'
    keys = {element.text for tag in ('buildtool_depend', 'depend', 'exec_depend')
            for element in root.iter(tag)}
    assert keys <= INTERFACE_KEYS, keys - INTERFACE_KEYS
    assert sorted(path.name for path in (INTERFACES / 'action').iterdir()) == ['Detect.action']
