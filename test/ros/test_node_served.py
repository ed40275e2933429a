"""perception_node with ``backend: openai`` against answer-server processes
(``answer_server.py``): the node process starting without its server (WARN, then used once it
answers), failed requests counted and logged once, no torch imported, start-up refusals that
name the reason. With a real vLLM server: test/backends/test_vllm_backend.py.
"""
import json
import os
import random
import re
import subprocess
import sys
import threading
import time

import pytest

rclpy = pytest.importorskip('rclpy')
from http_servers import IMAGE, AnswerServer, free_port  # noqa: E402
from waiting import wait_for  # noqa: E402


def _node_process(server_url, domain_id, *extra):
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id))
    command = [sys.executable, '-m', 'qwen_vl_perception.ros.node', '--ros-args',
               '-p', 'backend:=openai', '-p', f'server_url:={server_url}',
               '-p', 'categories:=[cup]', '-p', 'describe:=false',
               '-p', 'min_pixels:=1024', '-p', 'max_pixels:=16384', *extra]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    return process, lines


class Peer:
    """A camera and a /diagnostics listener in the test process, spun in a thread."""

    def __init__(self, domain_id):
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image
        from qwen_vl_perception.ros.spinning import Spinner
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node('remote_test_peer', context=self.context)
        self.diagnostics = []
        self.node.create_subscription(DiagnosticArray, '/diagnostics',
                                      lambda m: self.diagnostics.extend(m.status), 10)
        self.camera = self.node.create_publisher(
            Image, 'image', QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
        self.spinner = Spinner(self.context, self.node)

    def latest(self):
        return (self.diagnostics[-1] if self.diagnostics else None)

    def values(self, status):
        return {item.key: item.value for item in status.values}

    def send_frame(self, stamp):
        from sensor_msgs.msg import Image
        message = Image(height=48, width=64, encoding='rgb8', step=64 * 3,
                        data=IMAGE.tobytes())
        message.header.stamp.sec = stamp
        message.header.frame_id = 'camera'
        self.camera.publish(message)

    def close(self):
        self.spinner.stop()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def test_the_node_starts_without_its_server_warns_and_uses_it_once_it_answers():
    from diagnostic_msgs.msg import DiagnosticStatus
    domain_id, port = random.randint(1, 200), free_port()
    process, lines = _node_process(f'http://127.0.0.1:{port}/v1', domain_id)
    peer = server = None
    try:
        peer = Peer(domain_id)

        def warned():
            status = peer.latest()
            return (status is not None and status.level == DiagnosticStatus.WARN
                    and 'server unreachable' in status.message)
        wait_for(warned, 120, lambda: f'no WARN: {peer.latest()} {"".join(lines)}')
        assert 'cannot connect' in peer.latest().message
        assert peer.values(peer.latest())['server_reachable'] == 'False'
        assert process.poll() is None
        server = AnswerServer(port=port, content='[]')
        wait_for(lambda: peer.values(peer.latest())['server_reachable'] == 'True', 60,
                 lambda: f'server never seen: {peer.latest()} {"".join(lines)}')
        wait_for(lambda: peer.latest().level == DiagnosticStatus.OK, 30, 'still not OK')
        assert 'not answering yet' in ''.join(lines)
    finally:
        process.terminate()
        process.wait(timeout=60)
        if server is not None:
            server.stop()
        if peer is not None:
            peer.close()
    assert process.returncode == 0, ''.join(lines)


def test_failed_requests_are_counted_logged_once_and_the_node_keeps_going():
    from diagnostic_msgs.msg import DiagnosticStatus
    domain_id = random.randint(1, 200)
    body = json.dumps({'error': {'message': 'the engine is overloaded'}})
    server = AnswerServer(status=500, body=body)
    process, lines = _node_process(server.url, domain_id, '-p', 'input_reliability:=reliable')
    peer = None
    try:
        peer = Peer(domain_id)
        wait_for(lambda: any('ready' in line for line in lines), 120,
                 lambda: f'not ready: {"".join(lines)}')
        wait_for(lambda: peer.camera.get_subscription_count() > 0, 30, 'camera not connected')

        def errors():
            status = peer.latest()
            return int(peer.values(status)['inference_errors']) if status else 0
        for stamp in range(1, 600):  # a frame every 0.2 s until four requests have failed
            peer.send_frame(stamp)
            if errors() >= 4:
                break
            time.sleep(0.2)
        assert errors() >= 4, f'{peer.latest()} {"".join(lines)}'
        status = peer.latest()
        assert status.level == DiagnosticStatus.WARN
        assert 'the last request failed: HTTP 500' in status.message
        assert 'the engine is overloaded' in status.message
        assert process.poll() is None
        logged = [line for line in lines if 'a request failed' in line]
        assert len(logged) == 1, ''.join(lines)
        assert 'HTTP 500' in logged[0] and 'the engine is overloaded' in logged[0]
    finally:
        process.terminate()
        process.wait(timeout=60)
        server.stop()
        if peer is not None:
            peer.close()
    assert process.returncode == 0, ''.join(lines)


def test_the_node_with_a_served_model_imports_no_torch():
    with AnswerServer() as server:
        code = '\n'.join([
            'import sys, rclpy',
            'from rclpy.parameter import Parameter',
            'from qwen_vl_perception.ros.node import PerceptionNode',
            'rclpy.init()',
            "node = PerceptionNode(parameter_overrides=[Parameter('backend', value='openai'), "
            f"Parameter('server_url', value={server.url!r}), "
            "Parameter('categories', value=['cup'])])",
            "print(sorted(m for m in ('torch', 'transformers', 'bitsandbytes') "
            'if m in sys.modules))',
            'node.shutdown()', 'node.destroy_node()', 'rclpy.shutdown()'])
        done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                              timeout=300, env=dict(os.environ,
                                                    ROS_DOMAIN_ID=str(random.randint(1, 200))))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == '[]', done.stdout


def test_start_up_names_authentication_wrong_models_and_missing_urls():
    from rclpy.parameter import Parameter

    from qwen_vl_perception.ros.node import PerceptionNode, StartupError
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=random.randint(1, 200))
    refusal = json.dumps({'error': {'message': 'Invalid API key'}})
    try:
        def start(**values):
            values = {'backend': 'openai', 'categories': ['cup'], **values}
            PerceptionNode(context=context, parameter_overrides=[
                Parameter(name, value=value) for name, value in values.items()])
        with AnswerServer(models_status=401, models_body=refusal) as server:
            with pytest.raises(StartupError, match=re.escape(
                    f'authentication failed: HTTP 401 from {server.url}/models: Invalid API '
                    'key (no key sent: set server_api_key_env')):
                start(server_url=server.url)
        with AnswerServer(models=['default']) as server:
            with pytest.raises(StartupError, match="server_model 'qwen' is not served by .*"
                                                   "it serves: 'default'"):
                start(server_url=server.url, server_model='qwen')
        with pytest.raises(StartupError, match='backend openai needs server_url'):
            start()
        with pytest.raises(StartupError, match='must start with http:// or https://'):
            start(server_url='gpu-box:8000')
        with pytest.raises(StartupError, match='QVP_UNSET_KEY, which is not set'):
            start(server_url='http://127.0.0.1:1/v1', server_api_key_env='QVP_UNSET_KEY')
    finally:
        rclpy.try_shutdown(context=context)
