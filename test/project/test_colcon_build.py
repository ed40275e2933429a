"""The package builds with the real colcon (as on a robot) and its install tree works.

The tracked files are copied into a scratch workspace's ``src/``, ``colcon build`` (colcon from
PyPI, the ament_python build type of colcon-ros, and ament_cmake for the interface package
``qwen_vl_perception_interfaces``, over the venv's ROS wheels) installs both packages as the
README says, and the test checks what a robot's ``ros2 launch`` and ``ros2 run`` rely on: the
launch and config files and package.xml under ``share/``, the ament index marker,
``lib/qwen_vl_perception/perception_node`` and the tools, the packed default model and the
Detect action's Python module. Then the installed ``perception_node`` is started from the
sourced install tree with ``model_path:=default`` and stopped with Ctrl-C.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from locations import REPO_ROOT

pytest.importorskip('rclpy')
pytest.importorskip('torch')
ROOT = REPO_ROOT
PACKAGE = 'qwen_vl_perception'
INTERFACES = 'qwen_vl_perception_interfaces'


def _tracked_files():
    try:
        out = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True,
                             check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip('needs the git checkout (git ls-files) to copy the package')
    return [name for name in out.stdout.decode().split('\0') if name]


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    colcon = Path(sys.executable).with_name('colcon')
    if not colcon.exists():
        pytest.skip('colcon is not installed in this venv (tools/env/requirements.txt has it)')
    workspace = tmp_path_factory.mktemp('colcon-ws')
    source = workspace / 'src' / PACKAGE
    for name in _tracked_files():
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, target)
    env = dict(os.environ, PATH=f'{colcon.parent}{os.pathsep}{os.environ["PATH"]}')
    # Where it is set (these machines set it), setuptools warns that byte-compiling is off and
    # colcon counts that as stderr output: build as a robot's shell would.
    env.pop('PYTHONDONTWRITEBYTECODE', None)
    # Without a sourced distro, CMake finds ament_cmake, rosidl and vision_msgs in the venv.
    venv = Path(sys.prefix)
    env.setdefault('CMAKE_PREFIX_PATH', str(venv))
    env.setdefault('AMENT_PREFIX_PATH', str(venv))
    build = subprocess.run([str(colcon), 'build', '--base-paths', 'src',
                            f'src/{PACKAGE}/interfaces', '--packages-up-to', PACKAGE,
                            '--event-handlers', 'console_direct+',
                            '--cmake-args', f'-DPython3_EXECUTABLE={sys.executable}',
                            '-DBUILD_TESTING=OFF'], cwd=workspace, env=env,
                           capture_output=True, text=True, timeout=1500)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    return workspace, build.stdout + build.stderr


def test_colcon_build_is_clean(workspace):
    _, output = workspace
    assert '2 packages finished' in output
    # colcon reports any stderr of the build (e.g. setuptools' unknown-option warnings)
    assert 'had stderr output' not in output, output[-4000:]


def test_install_tree_has_what_launch_and_run_need(workspace):
    install = workspace[0] / 'install' / PACKAGE
    share = install / 'share' / PACKAGE
    assert (share / 'package.xml').is_file()
    assert (share / 'launch' / 'perception.launch.py').is_file()
    assert (share / 'config' / 'params.yaml').is_file()
    assert (share / 'config' / 'perception.rviz').is_file()
    assert (install / 'share' / 'ament_index' / 'resource_index' / 'packages' / PACKAGE).is_file()
    lib = install / 'lib' / PACKAGE
    assert os.access(lib / 'perception_node', os.X_OK)
    for tool in ('detect_folder.py', 'evaluate.py', 'quantize.py', 'merge_lora.py',
                 'benchmark.py'):
        assert (lib / tool).is_file(), tool
    parts = sorted(path.name for path in (ROOT / 'tools' / 'benchmarking').glob('*.py'))
    assert sorted(path.name for path in (lib / 'benchmarking').glob('*.py')) == parts
    packages = list(install.glob(f'lib/python3*/site-packages/{PACKAGE}'))
    assert len(packages) == 1, packages
    for name in ('weights.safetensors', 'manifest.json'):
        assert (packages[0] / 'default_model' / name).stat().st_size > 0
    interfaces = workspace[0] / 'install' / INTERFACES
    assert (interfaces / 'share' / INTERFACES / 'action' / 'Detect.action').is_file()
    assert list(interfaces.glob(f'lib/python3*/site-packages/{INTERFACES}/action/_detect.py'))


def test_installed_benchmark_imports_its_parts(workspace, tmp_path):
    """The installed benchmark finds ``benchmarking/`` beside it, as in the source tree."""
    ws = workspace[0]
    script = (f'source {ws}/install/setup.bash && '
              f'exec python {ws}/install/{PACKAGE}/lib/{PACKAGE}/benchmark.py --help')
    env = dict(os.environ, PATH=f'{Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}')
    done = subprocess.run(['bash', '-c', script], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert '--server URL' in done.stdout and 'tools/benchmark.py --device cpu' in done.stdout


def test_installed_node_starts_with_the_default_model(workspace, tmp_path):
    ws = workspace[0]
    env = dict(os.environ, ROS_DOMAIN_ID=str(os.getpid() % 100 + 1),
               QWEN_VL_PERCEPTION_CACHE=str(tmp_path / 'cache'))
    script = (f'source {ws}/install/setup.bash && '
              f'python -c "import {PACKAGE}; print({PACKAGE}.__file__)" && '
              f'python -c "import {INTERFACES}; print({INTERFACES}.__file__)" && '
              f'exec perception_node --ros-args -p model_path:=default -p device:=cpu')
    env['PATH'] = f'{Path(sys.executable).parent}{os.pathsep}{env["PATH"]}'
    node = subprocess.Popen(['bash', '-c', script], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 600
        for line in node.stdout:
            lines.append(line)
            if 'ready:' in line or time.monotonic() > deadline:
                break
        log = ''.join(lines)
        assert str(ws / 'install') in lines[0], 'the package was not imported from the install'
        assert str(ws / 'install' / INTERFACES) in lines[1], log
        assert 'ready:' in log and 'the detect action is off' not in log, log
        node.send_signal(signal.SIGINT)
        rest, _ = node.communicate(timeout=120)
        assert node.returncode == 0, log + rest
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
