"""tools/detect_folder.py --server (the openai backend): a server it cannot use is reported
before anything is written, failed requests skip their images. No torch needed (the tool's
tests on the model pipeline's fixtures: test_detect_folder.py)."""
import json
import subprocess
import sys

from http_servers import IMAGE, AnswerServer, free_port
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
