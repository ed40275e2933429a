"""The launch file's decisions, from the real file: ``launch``/``launch_ros`` are not on PyPI,
so ``generate_launch_description`` itself runs only where a distro is (see the README); the
helpers it calls need neither."""
import importlib.util
import os
import stat
from pathlib import Path

import pytest

from locations import REPO_ROOT

LAUNCH_FILE = REPO_ROOT / 'launch' / 'perception.launch.py'


@pytest.fixture(scope='module')
def launch_file():
    spec = importlib.util.spec_from_file_location('perception_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_path_overrides_the_params_file_only_when_given(launch_file):
    assert launch_file.node_parameters('/p/params.yaml', '') == ['/p/params.yaml']
    assert launch_file.node_parameters('/p/params.yaml', '/models/nf4') == \
        ['/p/params.yaml', {'model_path': '/models/nf4'}]


def test_autostart_and_depth_arguments_become_parameters_and_remappings(launch_file):
    assert launch_file.node_parameters('/p.yaml', '', 'false', '/cam/depth') == \
        ['/p.yaml', {'autostart': False, 'use_depth': True}]
    assert launch_file.node_parameters('/p.yaml', '', 'True', '') == \
        ['/p.yaml', {'autostart': True}]
    with pytest.raises(ValueError, match="autostart:='no'"):
        launch_file.node_parameters('/p.yaml', '', 'no', '')
    assert launch_file.remappings('/cam/color', '', '/cam/info') == \
        [('image', '/cam/color'), ('image/compressed', '/cam/color/compressed')]
    assert launch_file.remappings('/cam/color', '/cam/depth', '/cam/info')[2:] == \
        [('depth', '/cam/depth'), ('camera_info', '/cam/info')]


def test_rviz_flag_reads_like_launch_conditions(launch_file):
    assert [launch_file.launch_flag('rviz', text) for text in ('true', 'True', '1', ' false',
                                                               '0')] == \
        [True, True, True, False, False]
    with pytest.raises(ValueError, match="rviz:='yes'"):
        launch_file.launch_flag('rviz', 'yes')


def _prefix(root: Path, index=True, executable=True) -> Path:
    """An install prefix as colcon/apt lay it out: the ament index marker and lib/<pkg>/."""
    if index:
        marker = root / 'share' / 'ament_index' / 'resource_index' / 'packages' / 'rviz2'
        marker.parent.mkdir(parents=True)
        marker.write_text('')
    if executable:
        program = root / 'lib' / 'rviz2' / 'rviz2'
        program.parent.mkdir(parents=True)
        program.write_text('#!/bin/sh\n')
        program.chmod(program.stat().st_mode | stat.S_IXUSR)
    return root


def test_rviz_is_looked_up_where_launch_ros_finds_executables(launch_file, tmp_path,
                                                              monkeypatch):
    pytest.importorskip('ament_index_python')
    empty = tmp_path / 'empty'
    empty.mkdir()
    monkeypatch.setenv('AMENT_PREFIX_PATH', str(empty))
    monkeypatch.setenv('ROS_DISTRO', 'jazzy')
    reason = launch_file.rviz_missing_reason()
    assert reason.startswith('rviz:=true needs rviz2, which is not installed')
    assert 'sudo apt install ros-jazzy-rviz2' in reason and 'rviz:=false' in reason

    no_program = _prefix(tmp_path / 'no_program', executable=False)
    monkeypatch.setenv('AMENT_PREFIX_PATH', os.pathsep.join([str(empty), str(no_program)]))
    assert 'lib/rviz2/rviz2 is missing' in launch_file.rviz_missing_reason()

    installed = _prefix(tmp_path / 'installed')
    monkeypatch.setenv('AMENT_PREFIX_PATH', os.pathsep.join([str(empty), str(installed)]))
    assert launch_file.rviz_missing_reason() is None


# Where launch and launch_ros are installed (a distro) and the package is built (colcon):
# the launch file itself, through launch's LaunchService as `ros2 launch` runs it.
LAUNCH = '''
import sys
import launch
from launch.launch_description_sources import AnyLaunchDescriptionSource
arguments = [tuple(a.split(':=', 1)) for a in sys.argv[2:]]
service = launch.LaunchService(argv=sys.argv[2:], noninteractive=True)
service.include_launch_description(launch.LaunchDescription([
    launch.actions.IncludeLaunchDescription(AnyLaunchDescriptionSource(sys.argv[1]),
                                            launch_arguments=arguments)]))
sys.exit(service.run())
'''


@pytest.fixture
def installed_launch_file():
    pytest.importorskip('launch_ros', reason='needs launch and launch_ros (a ROS 2 distro)')
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    try:
        share = Path(get_package_share_directory('qwen_vl_perception'))
    except PackageNotFoundError:
        pytest.skip('qwen_vl_perception is not installed in the ament index (colcon build)')
    return share / 'launch' / 'perception.launch.py'


def _launch(launch_file, arguments, until=None, timeout=120):
    """Run the launch file; with ``until``, Ctrl-C it once a line contains that text. Returns
    the exit code, the output and the processes of its process group still alive."""
    import signal
    import subprocess
    import sys
    import threading
    import time
    process = subprocess.Popen(
        [sys.executable, '-c', LAUNCH, str(launch_file)] + arguments, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if until and any(until in line for line in lines):
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.2)
    code = process.wait(60)
    reader.join(5)
    time.sleep(1.0)
    alive = subprocess.run(['ps', '-o', 'pid=,stat=', '-g', str(process.pid)],
                           capture_output=True, text=True).stdout.split('\n')
    alive = [row.split()[0] for row in alive if row.strip() and 'Z' not in row.split()[1]]
    for pid in alive:
        os.kill(int(pid), signal.SIGKILL)
    return code, ''.join(lines), alive


def test_launch_takes_model_path_from_the_params_file(installed_launch_file, tiny_checkpoint,
                                                      tmp_path):
    params = tmp_path / 'params.yaml'
    params.write_text('/**:\n  ros__parameters:\n'
                      f'    model_path: {tiny_checkpoint}\n    device: cpu\n'
                      '    quantization: none\n    min_pixels: 1024\n    max_pixels: 16384\n')
    code, output, alive = _launch(installed_launch_file, [f'params_file:={params}'],
                                  until=']: ready:')
    assert ']: ready:' in output and code == 0 and not alive, output
    assert 'Loading weights' not in output and '%|' not in output  # quiet under launch


def test_rviz_without_rviz2_starts_nothing(installed_launch_file, launch_file, tmp_path):
    if launch_file.rviz_missing_reason() is None:
        pytest.skip('rviz2 is installed here')
    code, output, alive = _launch(installed_launch_file, ['rviz:=true'], timeout=60)
    assert code == 1 and 'rviz:=true needs rviz2' in output, output
    assert 'process started' not in output and not alive, output
