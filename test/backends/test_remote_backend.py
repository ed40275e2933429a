"""The openai backend's parts and faults, against real HTTP server processes.

Images: resized here as the model's processor would resize them (so a server's processor
leaves them alone and sees the local engine's pixels). Answers: text, token offsets and
scores rebuilt from token bytes as the local engine builds them. Faults: a port nobody
listens on, a real server that stops and comes back, servers answering 401, 403, 500, bad
JSON, too late, no log-probabilities, other models; HTTPS with a certificate of our own; the
node process starting without its server, counting failed requests and logging them once.
The real vLLM server is in ``test_vllm_backend.py`` beside this file.
"""
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from qwen_vl_perception.backends.answers import (MISMATCHED_LOGPROBS, NO_LOGPROBS,
                                                 parse_answer, text_and_offsets)
from qwen_vl_perception.backends.http_client import (AuthenticationError, BadAnswer,
                                                     HttpStatusError, RequestTimedOut,
                                                     ServerUnreachable)
from qwen_vl_perception.backends.images import fit_to_budget, image_for_server
from qwen_vl_perception.backends.openai_engine import (RETRY_MAX_S, OpenAIEngine,
                                                       ServerModelError)
from qwen_vl_perception.detector import DetectionSettings, Detector
from qwen_vl_perception.model.pixel_budget import image_factor, resized_size

from http_servers import AnswerServer, free_port, self_signed_certificate
from locations import REPO_ROOT
from waiting import wait_for

IMAGE = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
ANSWER = '```json\n[{"bbox_2d": [100, 200, 300, 400], "label": "cup"}]\n```'


def logprob_entries(pieces, logprob=-0.1):
    return [{'token': piece, 'logprob': logprob, 'bytes': list(piece.encode()),
             'top_logprobs': []} for piece in pieces]


def completion(content, entries=None, finish_reason='stop'):
    choice = {'index': 0, 'finish_reason': finish_reason,
              'message': {'role': 'assistant', 'content': content}}
    if entries is not None:
        choice['logprobs'] = {'content': entries}
    return {'choices': [choice], 'usage': {'prompt_tokens': 42}}


# -- images ---------------------------------------------------------------------------------

def _smart_resize():
    pytest.importorskip('transformers')
    # the PIL backend's module: importable without torchvision
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl
    return image_processing_pil_qwen2_vl.smart_resize


def test_resized_size_is_the_qwen_vl_processors_rule():
    smart_resize = _smart_resize()
    rng = random.Random(1)
    sizes = [(640, 480), (1920, 1080), (31, 17), (8, 1000), (5, 5), (33, 47), (4096, 3072)]
    sizes += [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(400)]
    for width, height in sizes:
        if max(width, height) / min(width, height) > 200:
            continue
        for factor, low, high in ((32, 1024, 36864), (32, 65536, 409600), (28, 3136, 1003520)):
            expected_h, expected_w = smart_resize(height, width, factor, low, high)
            assert resized_size(width, height, low, high, factor) == (expected_w, expected_h)
    with pytest.raises(ValueError, match='200 times'):
        resized_size(2010, 10, 1024, 36864)


def test_an_image_fitted_here_gives_the_model_the_same_pixels(tiny_checkpoint):
    torch = pytest.importorskip('torch')
    from qwen_vl_perception.model.processor import InputBuilder
    builder = InputBuilder.from_pretrained(tiny_checkpoint, min_pixels=4096, max_pixels=65536,
                                           image_backend='pil')
    factor = image_factor(tiny_checkpoint)
    assert factor == 32
    rng = np.random.default_rng(2)
    for height, width in ((480, 640), (300, 400), (37, 101), (64, 64)):
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        fitted = fit_to_budget(rgb, builder.min_pixels, builder.max_pixels, factor)
        original, sent = builder.build([rgb], 'x'), builder.build([fitted], 'x')
        assert torch.equal(original.tensors['pixel_values'], sent.tensors['pixel_values'])
        assert original.model_input_sizes == [(fitted.shape[1], fitted.shape[0])]
    url, size = image_for_server(IMAGE, 4096, 65536)
    assert url.startswith('data:image/png;base64,') and size == (64, 64)


# -- answers --------------------------------------------------------------------------------

def _gpt2_byte_decoder():
    """The byte-level BPE alphabet (printable bytes as themselves, the rest from U+0100)."""
    printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
                 + list(range(ord('®'), ord('ÿ') + 1)))
    extra = 0
    decoder = {}
    for byte in range(256):
        if byte in printable:
            decoder[chr(byte)] = byte
        else:
            decoder[chr(256 + extra)] = byte
            extra += 1
    return decoder


def test_offsets_from_token_bytes_are_the_local_engines(tiny_checkpoint):
    transformers = pytest.importorskip('transformers')
    from qwen_vl_perception.model.generation import decode_with_offsets
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    byte_of = _gpt2_byte_decoder()
    split_characters = 0
    for text in (ANSWER, 'größe 日本語のテキスト 🎉🦜 café — naïve', '"label": "🧯 extinguisher"'):
        ids = tokenizer(text)['input_ids']
        token_bytes = [bytes(byte_of[char] for char in token)
                       for token in tokenizer.convert_ids_to_tokens(ids)]
        assert text_and_offsets(token_bytes) == decode_with_offsets(tokenizer, ids)
        split_characters += sum(1 for start, end in text_and_offsets(token_bytes)[1]
                                if start == end)
    assert split_characters > 0  # tokens holding part of a character were covered


def test_an_answer_becomes_the_local_engines_generation():
    pieces = ['```', 'json', '\n[{"', 'bbox', '_', '2', 'd', '":', ' [', '1', '0', '0', ',',
              ' ', '2', '0', '0', ', ', '3', '0', '0', ', ', '4', '0', '0', '],', ' "', 'label',
              '":', ' "', 'cup', '"}', ']\n', '```']
    assert ''.join(pieces) == ANSWER
    entries = logprob_entries(pieces) + logprob_entries(['<|im_end|>'], -1e-6)
    answer = parse_answer(completion(ANSWER, entries), (64, 48))
    generation = answer.generation
    assert answer.logprob_problem is None and answer.prompt_tokens == 42
    assert generation.text == ANSWER and generation.finished
    assert generation.model_input_size == (64, 48)
    assert len(generation.token_probs) == len(pieces)  # the stop token is not the answer's
    assert generation.token_probs[0] == pytest.approx(math.exp(-0.1))
    assert generation.token_offsets[-1] == (len(ANSWER) - 3, len(ANSWER))
    cut = parse_answer(completion(ANSWER, logprob_entries(pieces), 'length')).generation
    assert not cut.finished and len(cut.token_probs) == len(pieces)


def test_an_answer_without_usable_logprobs_scores_one_and_says_why():
    for entries, problem in ((None, NO_LOGPROBS), ([], NO_LOGPROBS),
                             (logprob_entries(['```', 'yaml']), MISMATCHED_LOGPROBS),
                             ([{'token': 'x'}], MISMATCHED_LOGPROBS)):
        answer = parse_answer(completion(ANSWER, entries))
        assert answer.logprob_problem == problem
        assert answer.generation.token_probs == [] and answer.generation.text == ANSWER
    for broken in ({}, {'choices': []}, {'choices': [{'message': {}}]},
                   {'choices': [{'message': {'content': 3}}]}):
        with pytest.raises(ValueError, match='content'):
            parse_answer(broken)


# -- the engine against real servers ----------------------------------------------------------

def engine_for(url, **kwargs):
    kwargs.setdefault('timeout_s', 30.0)
    return OpenAIEngine(url, min_pixels=1024, max_pixels=16384, **kwargs)


def test_a_port_nobody_listens_on_is_unreachable_with_a_growing_back_off():
    engine = engine_for(f'http://127.0.0.1:{free_port()}/v1')
    assert not engine.status.reachable
    waits = []
    for _ in range(6):
        with pytest.raises(ServerUnreachable, match='cannot connect'):
            engine.connect()
        waits.append(engine.status.retry_in_s)
    assert not engine.ready()  # within the back-off: not even tried
    assert 'cannot connect' in engine.status.reason
    assert waits[0] <= 1.0 and waits[1] > 1.0 and waits[2] > 2.0
    assert 5.0 < waits[-1] <= RETRY_MAX_S
    with pytest.raises(ServerUnreachable):
        engine.generate([IMAGE], 'find cups', 8)
    engine.close()


def test_a_server_that_stops_and_comes_back_is_used_again():
    server = AnswerServer(content=ANSWER)
    engine = engine_for(server.url)
    try:
        assert engine.connect() == ['default'] and engine.ready()
        assert engine.generate([IMAGE], 'find cups', 8)[0].text == ANSWER
        server.stop()
        with pytest.raises(ServerUnreachable):
            engine.generate([IMAGE], 'find cups', 8)
        assert not engine.ready()
        server = AnswerServer(content=ANSWER, port=server.port)
        wait_for(engine.ready, 60, lambda: f'never reachable again: {engine.status}')
        assert engine.generate([IMAGE, IMAGE], 'find cups', 8)[1].text == ANSWER
    finally:
        server.stop()
        engine.close()


def test_http_errors_are_one_line_with_the_servers_message():
    body = json.dumps({'error': {'message': 'out of memory\n  while decoding', 'code': 500}})
    with AnswerServer(status=500, body=body) as server:
        engine = engine_for(server.url)
        with pytest.raises(HttpStatusError) as caught:
            engine.generate([IMAGE], 'find cups', 8)
        message = str(caught.value)
        assert message == (f'HTTP 500 from {server.url}/chat/completions: out of memory '
                           'while decoding')
        assert caught.value.status == 500 and engine.ready()  # it answers: not unreachable
        engine.close()
    with AnswerServer(status=200, body='{"choices": [{"message": ') as server:
        with pytest.raises(BadAnswer, match=r'is not JSON: .*choices'):
            engine_for(server.url).generate([IMAGE], 'find cups', 8)
    with AnswerServer(status=200, body='{"text": "an old completions API"}') as server:
        with pytest.raises(BadAnswer, match='not a chat completion: it has no choices'):
            engine_for(server.url).generate([IMAGE], 'find cups', 8)
    with AnswerServer(models_status=200, models_body='<html>a web page</html>') as server:
        with pytest.raises(BadAnswer, match='not JSON'):
            engine_for(server.url).connect()


def test_authentication_failures_say_so_and_never_show_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv('QVP_TEST_KEY', 's3cret-key')
    record = tmp_path / 'requests.jsonl'
    refusal = json.dumps({'error': {'message': 'Unauthorized'}})
    with AnswerServer(models_status=401, models_body=refusal, record=str(record)) as server:
        engine = engine_for(server.url, api_key_env='QVP_TEST_KEY')
        with pytest.raises(AuthenticationError) as caught:
            engine.connect()
        assert str(caught.value).startswith('authentication failed: HTTP 401 from ')
        assert 'Unauthorized' in str(caught.value)
        assert [r['authorization'] for r in server.requests()] == ['Bearer s3cret-key']
        assert 's3cret-key' not in str(caught.value) + repr(engine) + engine.description
    with AnswerServer(status=403, body=json.dumps({'detail': 'key not allowed'})) as server:
        with pytest.raises(AuthenticationError, match='HTTP 403 .*key not allowed'):
            engine_for(server.url).generate([IMAGE], 'find cups', 8)
    with pytest.raises(ValueError, match='QVP_NO_SUCH_KEY, which is not set'):
        engine_for('http://127.0.0.1:1/v1', api_key_env='QVP_NO_SUCH_KEY')


def test_a_slow_answer_times_out():
    with AnswerServer(delay_s=10, content=ANSWER) as server:
        engine = engine_for(server.url, timeout_s=0.5)
        with pytest.raises(RequestTimedOut, match=r'no answer within 0\.5 s'):
            engine.generate([IMAGE], 'find cups', 8)


def test_the_model_is_picked_from_those_served():
    with AnswerServer(models=['qwen3-vl-4b', 'qwen3-vl-4b-lora']) as server:
        with pytest.raises(ServerModelError) as caught:
            engine_for(server.url, model='qwen3-vl-8b').connect()
        assert str(caught.value) == (f"server_model 'qwen3-vl-8b' is not served by "
                                     f"{server.url}; it serves: 'qwen3-vl-4b', "
                                     "'qwen3-vl-4b-lora'")
        with pytest.raises(ServerModelError, match='serves 2 models .*name one in server_model'):
            engine_for(server.url).connect()
        engine = engine_for(server.url, model='qwen3-vl-4b-lora')
        engine.connect()
        assert engine.model_name == 'qwen3-vl-4b-lora'
    with AnswerServer(models=['only']) as server:
        engine = engine_for(server.url.replace('/v1', ''))  # no path: /v1 is added
        assert engine.connect() == ['only'] and engine.model_name == 'only'


def test_a_server_without_logprobs_gets_the_fallback_score_and_a_diagnostic():
    with AnswerServer(content=ANSWER) as server:  # its answers carry no logprobs
        engine = engine_for(server.url)
        detector = Detector(engine, DetectionSettings(categories=('cup',), describe=False))
        (frame,) = detector.detect([IMAGE])
        assert [(d.label, d.score) for d in frame.detections] == [('cup', 1.0)]
        assert engine.answers_without_logprobs == 1
        assert engine.last_logprob_problem == NO_LOGPROBS


def test_https_with_the_servers_certificate(tmp_path, monkeypatch):
    pair = self_signed_certificate(tmp_path)
    if pair is None:
        pytest.skip('no openssl command to make a certificate with')
    cert, key = pair
    with AnswerServer(certfile=str(cert), keyfile=str(key), content=ANSWER) as server:
        assert server.url.startswith('https://')
        with pytest.raises(ServerUnreachable, match='TLS failed: .*CERTIFICATE_VERIFY_FAILED'):
            engine_for(server.url).connect()  # not signed by a CA this machine trusts
        monkeypatch.setenv('SSL_CERT_FILE', str(cert))
        engine = engine_for(server.url)
        assert engine.connect() == ['default']
        assert engine.generate([IMAGE], 'find cups', 8)[0].text == ANSWER


# -- the node process -----------------------------------------------------------------------

rclpy = None


def _ros():
    global rclpy
    rclpy = pytest.importorskip('rclpy')
    return rclpy


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
        from spinning import Spinner
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
    _ros()
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
    _ros()
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
    _ros()
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
    _ros()
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


# -- the tools ------------------------------------------------------------------------------

def _detect_folder(*arguments):
    done = subprocess.run([sys.executable, str(REPO_ROOT / 'tools' / 'detect_folder.py'),
                           *map(str, arguments)], capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


def test_detect_folder_reports_a_server_it_cannot_use(tmp_path):
    from PIL import Image
    images = tmp_path / 'images'
    images.mkdir()
    for name in ('a.png', 'b.png'):
        Image.fromarray(IMAGE).save(images / name)
    out = tmp_path / 'out'
    common = ['--images', images, '--out', out, '--categories', 'cup', '--quiet']
    code, _, stderr = _detect_folder('--server', f'http://127.0.0.1:{free_port()}/v1', *common)
    assert code == 2 and 'error: ' in stderr and 'cannot connect' in stderr, stderr
    assert not out.exists()  # asked before anything was written
    code, _, stderr = _detect_folder(*common)
    assert code == 2 and '--model is required (or --server URL' in stderr
    body = json.dumps({'error': {'message': 'no capacity'}})
    with AnswerServer(status=500, body=body) as server:
        code, stdout, stderr = _detect_folder('--server', server.url, *common)
    assert code == 1, stdout + stderr  # no image could be processed
    assert stderr.count('detection failed for') == 2 and 'HTTP 500' in stderr
    assert 'no capacity' in stderr
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['processed'] == 0 and len(summary['skipped']) == 2
    assert summary['server'] == server.url and summary['server_model'] == 'default'
