"""tools/detect_folder.py --server (the openai backend): a server it cannot use is reported
before anything is written, a failed batch is tried again an image at a time, images that
still fail are skipped. No torch needed (the tool's
tests on the model pipeline's fixtures: test_detect_folder.py)."""
import json
import subprocess
import sys

from http_servers import ANSWER, IMAGE, AnswerServer, free_port
from locations import REPO_ROOT


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


def test_detect_folder_tries_a_failed_batch_again_an_image_at_a_time(tmp_path):
    from PIL import Image
    images = tmp_path / 'images'
    images.mkdir()
    for name in ('a.png', 'b.png', 'c.png'):
        Image.fromarray(IMAGE).save(images / name)
    body = json.dumps({'error': {'message': 'busy'}})
    for retries, processed in ((1, 3), (0, 1)):
        out = tmp_path / f'out{retries}'
        # the first request fails: its batch (a, b; the other request answered) fails whole
        with AnswerServer(status=503, body=body, fail_first=1, content=ANSWER) as server:
            code, stdout, stderr = _detect_folder(
                '--server', server.url, '--images', images, '--out', out, '--categories',
                'cup', '--batch-size', 2, '--retries', retries, '--quiet')
        assert code == 0, stdout + stderr
        summary = json.loads((out / 'summary.json').read_text())
        assert summary['processed'] == processed, stdout + stderr
        assert summary['detections'] == processed  # the answer's one cup each
        if retries:
            assert summary['skipped'] == []
            assert [entry['image'] for entry in summary['retried']] == ['a.png', 'b.png']
            assert 'HTTP 503' in summary['retried'][0]['reason'] and 'busy' in stderr
            assert '3 of 3 images processed (0 skipped, 2 tried again)' in stdout
        else:
            assert [entry['image'] for entry in summary['skipped']] == ['a.png', 'b.png']
            assert summary['retried'] == [] and stderr.count('detection failed for') == 2


def test_a_retry_that_fails_too_stops_retrying_for_the_run(tmp_path):
    """A server that keeps failing costs one more round of requests, not one per image: its
    first five requests fail, later ones are answered."""
    from PIL import Image
    images = tmp_path / 'images'
    images.mkdir()
    for name in ('a.png', 'b.png', 'c.png', 'd.png', 'e.png'):
        Image.fromarray(IMAGE).save(images / name)
    record = tmp_path / 'requests.jsonl'
    out = tmp_path / 'out'
    with AnswerServer(status=503, body='{"error": {"message": "busy"}}', fail_first=5,
                      content=ANSWER, record=str(record)) as server:
        code, stdout, stderr = _detect_folder(
            '--server', server.url, '--images', images, '--out', out, '--categories', 'cup',
            '--batch-size', 2, '--quiet')
        chats = [entry for entry in server.requests() if entry['method'] == 'POST']
    assert code == 0, stdout + stderr
    summary = json.loads((out / 'summary.json').read_text())
    # a, b: two failed requests, tried again (the batch whole: two more), failed again, so
    # retrying stops; c, d: one of two requests fails, skipped without a retry; e answered
    assert [entry['image'] for entry in summary['retried']] == ['a.png', 'b.png']
    skipped = [entry['image'] for entry in summary['skipped']]
    assert skipped == ['a.png', 'b.png', 'c.png', 'd.png'], stderr
    assert summary['processed'] == 1 and summary['detections'] == 1
    assert stderr.count('trying again did not help') == 1
    assert len(chats) == 2 + 2 + 2 + 1  # no request per image on top


def test_a_local_batch_is_tried_again_an_image_at_a_time():
    """The retry policy alone (the model's own failures are the engine tests'): a detector
    that cannot take two images at once (as a GPU out of memory), and one image it cannot take
    at all."""
    from pathlib import Path

    from tool_runs import load_tool
    tool = load_tool('detect_folder')
    calls = []

    class Frame:
        seconds = 0.5

    class Detector:
        def detect(self, images):
            calls.append(list(images))
            if len(images) > 1 or images[0] == 'bad':
                raise RuntimeError('CUDA out of memory')
            return [Frame() for _ in images]

    batch = [(Path(f'{name}.png'), name) for name in ('a', 'b', 'c')]
    retried = []
    policy = tool.RetryPolicy(1, whole_batch=False)
    results = tool._detect_batch(Detector(), batch, policy, retried)
    assert calls == [['a', 'b', 'c'], ['a'], ['b'], ['c']]
    assert [(path.name, frame is not None, shared) for path, _, frame, shared, _ in results] \
        == [('a.png', True, 1), ('b.png', True, 1), ('c.png', True, 1)]
    assert [entry['image'] for entry in retried] == ['a.png', 'b.png', 'c.png']
    assert not policy.stopped
    calls.clear()
    batch = [(Path(f'{name}.png'), name) for name in ('bad', 'd')]
    results = tool._detect_batch(Detector(), batch, policy, retried)
    assert calls == [['bad', 'd'], ['bad']] and policy.stopped  # d: not tried again
    assert [(path.name, frame is None) for path, _, frame, _, _ in results] == [
        ('bad.png', True), ('d.png', True)]
    calls.clear()
    assert tool._detect_batch(Detector(), batch, policy, retried)[0][2] is None
    assert calls == [['bad', 'd']]  # stopped: no retry at all
