"""backends/openai_engine.py and its HTTP client against real server processes
(``answer_server.py``): a port nobody listens on, a server that stops and comes back, servers
answering 401, 403, 500, bad JSON, too late, no log-probabilities, other models; HTTPS with a
certificate of our own. The real vLLM server: ``test_vllm_backend.py`` beside this file.
"""
import json

import pytest

from qwen_vl_perception.backends.answers import NO_LOGPROBS
from qwen_vl_perception.backends.http_client import (AuthenticationError, BadAnswer,
                                                     HttpStatusError, RequestTimedOut,
                                                     ServerUnreachable)
from qwen_vl_perception.backends.openai_engine import (RETRY_MAX_S, OpenAIEngine,
                                                       ServerModelError)
from qwen_vl_perception.detector import DetectionSettings, Detector

from http_servers import ANSWER, IMAGE, AnswerServer, free_port, self_signed_certificate
from waiting import wait_for


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
