"""perception_node as a process over real DDS, with a real (tiny, trained) Qwen3-VL on the CPU
(``answering_model``): start-up errors with one clear message, Ctrl-C and SIGTERM shutting it
down cleanly, compressed image bombs refused before decoding, a planted default-model cache.
"""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from locations import SUPPORT_DIR

rclpy = pytest.importorskip('rclpy')
pytest.importorskip('torch')
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from vision_msgs.msg import Detection2DArray  # noqa: E402

from answering_model import node_parameters  # noqa: E402
from image_bombs import lossless_webp  # noqa: E402
from node_harness import diagnostic, rgb_image  # noqa: E402
from qwen_vl_perception.ros.spinning import Spinner  # noqa: E402
from waiting import wait_for  # noqa: E402

# A thread that fails (e.g. InvalidHandle from a node destroyed under a spinning executor)
# fails the test instead of leaving a warning.
pytestmark = pytest.mark.filterwarnings('error::pytest.PytestUnhandledThreadExceptionWarning')


def _run_node(arguments, domain_id=None, env=None, **kwargs):
    env = dict(env or os.environ, ROS_DOMAIN_ID=str(domain_id or random.randint(1, 200)))
    command = [sys.executable, '-m', 'qwen_vl_perception.ros.node', '--ros-args'] + arguments
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


def _follow_with_peer_context(process, domain_id):
    """For a node process: its output lines (collected by the returned reader thread as they
    come) and a started rclpy context on its domain for the test's own peer node."""
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id)
    return lines, reader, context


def test_missing_model_stops_start_up_with_one_clear_message(tmp_path):
    process = _run_node(['-p', f'model_path:={tmp_path / "no-such-model"}'])
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1
    assert 'cannot start' in output and 'no-such-model' in output
    assert 'Traceback' not in output


def test_a_pickle_checkpoint_stops_start_up_with_one_line(tiny_checkpoint, tmp_path):
    import pickle
    import shutil
    model = tmp_path / 'pickled'
    shutil.copytree(tiny_checkpoint, model, ignore=shutil.ignore_patterns('*.safetensors'))
    # A pickle that would run a command when loaded by an unsafe loader; none may load it.
    (model / 'pytorch_model.bin').write_bytes(
        pickle.dumps(subprocess.Popen, protocol=2) + b'not even a complete pickle')
    process = _run_node(['-p', f'model_path:={model}', '-p', 'device:=cpu',
                         '-p', 'quantization:=none'])
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1, output
    assert 'cannot start' in output and 'only safetensors checkpoints' in output, output
    assert 'Traceback' not in output, output


def test_default_model_that_cannot_be_prepared_stops_start_up_cleanly(tmp_path):
    not_a_folder = tmp_path / 'cache-is-a-file'
    not_a_folder.write_text('')
    process = _run_node(['-p', 'model_path:=default'],
                        env=dict(os.environ, QWEN_VL_PERCEPTION_CACHE=str(not_a_folder)))
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 1
    assert 'cannot start: default model' in output and 'Traceback' not in output


@pytest.mark.parametrize('busy', [False, True], ids=['idle', 'during-inference'])
def test_ctrl_c_shuts_the_node_down_cleanly(answering_checkpoint, busy):
    params = node_parameters(answering_checkpoint)
    arguments = []
    for name in ('model_path', 'device', 'quantization', 'min_pixels', 'max_pixels'):
        arguments += ['-p', f'{name}:={params[name]}']
    domain_id = random.randint(1, 200)
    process = _run_node(arguments, domain_id=domain_id)
    lines, reader, context = _follow_with_peer_context(process, domain_id)
    spinner = None
    try:
        wait_for(lambda: any('ready' in line for line in lines), 120, f'not ready: {lines}')
        assert any('ready: 2 categories,' in line for line in lines), lines
        if busy:  # a camera keeps the model busy: Ctrl-C lands while a frame is in flight
            peer = rclpy.create_node('ctrl_c_camera', context=context)
            received = []
            peer.create_subscription(Detection2DArray, 'detections', received.append, 10)
            camera = peer.create_publisher(Image, 'image', 5)
            spinner = Spinner(context, peer)
            wait_for(lambda: camera.get_subscription_count() > 0, 10, 'not connected')
            # Small frames: large best-effort messages between processes may be lost under load.
            for stamp in range(600):
                camera.publish(rgb_image(stamp, width=64, height=48))
                if received:
                    break
                time.sleep(0.05)
            assert received, 'the node answered no frame'
            camera.publish(rgb_image(999, width=64, height=48))
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0
        reader.join(5)
        assert not any('Traceback' in line for line in lines), ''.join(lines)
        # Quiet under `ros2 launch`: no progress bars of the model loading.
        assert not any('Loading weights' in line or '%|' in line for line in lines), lines
    finally:
        process.kill()
        if spinner is not None:  # stopped before its node goes (see Harness.close)
            spinner.stop()
            peer.destroy_node()
        rclpy.try_shutdown(context=context)


def _node_process_arguments(checkpoint, **overrides):
    params = node_parameters(checkpoint, **overrides)
    arguments = []
    for name in ('model_path', 'device', 'quantization', 'min_pixels', 'max_pixels',
                 *overrides):
        arguments += ['-p', f'{name}:={params[name]}']
    return arguments


def _peak_memory_mb(pid):
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) // 1024
    raise AssertionError(f'no VmHWM for process {pid}')


def test_compressed_images_are_refused_by_their_declared_size_before_decoding(
        answering_checkpoint):
    import cv2
    domain_id = random.randint(1, 200)
    process = _run_node(_node_process_arguments(
        answering_checkpoint, input_transport='compressed', input_reliability='reliable'),
        domain_id=domain_id)
    lines, reader, context = _follow_with_peer_context(process, domain_id)
    peer = spinner = None
    try:
        wait_for(lambda: any('ready' in line for line in lines), 120, f'not ready: {lines}')
        peer = rclpy.create_node('bomb_camera', context=context)
        detections, diagnostics = [], []
        peer.create_subscription(Detection2DArray, 'detections', detections.append, 10)
        peer.create_subscription(DiagnosticArray, '/diagnostics', diagnostics.append, 10)
        camera = peer.create_publisher(CompressedImage, 'image/compressed',
                                       QoSProfile(depth=10,
                                                  reliability=ReliabilityPolicy.RELIABLE))
        spinner = Spinner(context, peer)
        wait_for(lambda: camera.get_subscription_count() > 0, 10, 'not connected')
        line = cv2.imencode('.png', np.zeros((1, 4096, 3), np.uint8))[1].tobytes()
        good = cv2.imencode('.jpg', np.zeros((48, 64, 3), np.uint8))[1].tobytes()

        def send(stamp, data, image_format):
            message = CompressedImage(format=image_format, data=data)
            message.header.stamp.sec = stamp
            camera.publish(message)
        # Until one good frame is answered, both sides of the connection may not be matched
        # yet (a loaded machine): warm up first, so that none of the frames below is lost.
        deadline = time.monotonic() + 120
        stamp = 100
        while not detections and time.monotonic() < deadline:
            send(stamp, good, 'jpeg')
            stamp += 1
            resend = time.monotonic() + 2
            while not detections and time.monotonic() < resend:
                time.sleep(0.02)
        assert detections, 'no warm-up frame was answered:\n' + ''.join(lines)
        answered_before = len(detections)
        before = _peak_memory_mb(process.pid)
        # 52 bytes that decode to 16383 x 16383 pixels (1.8 GB), then a valid 4096 x 1 line
        # (the model refuses aspect ratios above 200), then a good frame.
        send(1, lossless_webp(16383, 16383), 'webp')
        send(2, line, 'png')
        send(3, good, 'jpeg')
        wait_for(lambda: any(a.header.stamp.sec == 3 for a in detections), 120,
                 'the good frame was not answered:\n' + ''.join(lines))
        assert [a.header.stamp.sec for a in detections[answered_before:]
                if a.header.stamp.sec < 100] == [3]
        wait_for(lambda: any(diagnostic(d, 'invalid_images') == '2' for d in diagnostics), 10,
                 'the two images are not counted as invalid')
        assert all(diagnostic(d, 'inference_errors') == '0' for d in diagnostics)
        log = ''.join(lines)
        assert 'exceeds the limit of 16777216 pixels (declared in the WebP header)' in log, log
        assert _peak_memory_mb(process.pid) - before < 400  # the bomb was never decoded
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0
    finally:
        process.kill()
        if spinner is not None:
            spinner.stop()
        if peer is not None:
            peer.destroy_node()
        rclpy.try_shutdown(context=context)


@pytest.mark.skipif(os.geteuid() != 0, reason='planting a folder of another user needs root')
def test_a_planted_or_changed_default_model_cache_stops_start_up(default_model_float32,
                                                                 tmp_path):
    import shutil
    built = default_model_float32
    home = tmp_path / 'cache' / built.parent.name
    planted = home / built.name
    shutil.copytree(built, planted)
    home.chmod(0o755)
    prompt = planted / 'detection_prompt.json'
    record = json.loads(prompt.read_text())

    def refusal():
        process = _run_node(['-p', 'model_path:=default', '-p', 'quantization:=none',
                             '-p', 'device:=cpu'],
                            env=dict(os.environ, QWEN_VL_PERCEPTION_CACHE=str(tmp_path / 'cache')))
        try:
            output, _ = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # it started with what was planted
            process.kill()
            output, _ = process.communicate()
        assert process.returncode == 1 and 'cannot start: default model' in output, output
        assert 'Traceback' not in output, output
        return output

    prompt.write_text(json.dumps(dict(record, categories=['attacker_chosen'])))
    assert 'detection_prompt.json does not match its hash' in refusal()
    shutil.copy(built / prompt.name, prompt)
    for path in (home, planted, *planted.iterdir()):  # another user's copy, content intact
        os.chown(path, 65534, 65534)
    assert 'uid 65534' in refusal()
    os.chown(home, 0, 0)  # the folder above trusted, the model folder not
    assert 'belongs to uid 65534' in refusal()
    for path in (home, planted, *planted.iterdir()):
        os.chown(path, 0, 0)
    planted.chmod(0o777)
    assert 'writable by group or others' in refusal()
    planted.chmod(0o755)
    (planted / 'extra.py').write_text('')
    assert "extra: ['extra.py']" in refusal()


def test_sigterm_while_publishing_publishes_before_the_context_goes(answering_checkpoint):
    domain_id = random.randint(1, 200)
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id))
    process = subprocess.Popen(
        [sys.executable, str(SUPPORT_DIR / 'shutdown_race_node.py'), '--ros-args',
         *_node_process_arguments(answering_checkpoint, input_reliability='reliable')],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, reader, context = _follow_with_peer_context(process, domain_id)
    peer = None
    try:
        wait_for(lambda: any('ready' in line for line in lines), 120, f'not ready: {lines}')
        peer = rclpy.create_node('race_camera', context=context)
        camera = peer.create_publisher(Image, 'image', QoSProfile(
            depth=5, reliability=ReliabilityPolicy.RELIABLE))
        wait_for(lambda: camera.get_subscription_count() > 0, 10, 'not connected')
        camera.publish(rgb_image(1, width=64, height=48))
        assert process.wait(timeout=120) == 0, ''.join(lines)
        reader.join(5)
        log = ''.join(lines)
        assert 'published after SIGTERM' in log and 'publishing failed' not in log, log
        assert 'Traceback' not in log, log
    finally:
        process.kill()
        if peer is not None:
            peer.destroy_node()
        rclpy.try_shutdown(context=context)
