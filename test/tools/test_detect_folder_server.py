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
