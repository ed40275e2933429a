"""The launch file's decisions, from the real file: ``launch``/``launch_ros`` are not on PyPI,
so ``generate_launch_description`` itself runs only where a distro is (see the README); the
helpers it calls need neither."""
import importlib.util
import os
import stat
from pathlib import Path

import pytest

LAUNCH_FILE = Path(__file__).resolve().parent.parent / 'launch' / 'perception.launch.py'


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
