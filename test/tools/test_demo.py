"""tools/demo.py: input checks before loading, unreadable images skipped and listed."""
import subprocess
import sys

import numpy as np
import pytest

from tool_runs import TOOLS, run_tool

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('peft')
pytest.importorskip('bitsandbytes')


def test_demo_checks_its_inputs_before_loading_or_writing(tmp_path, tiny_checkpoint):
    empty = tmp_path / 'empty'
    empty.mkdir()
    code, _, stderr = run_tool('demo', ['--model', tmp_path / 'nope', '--out', tmp_path / 'o1'])
    assert code == 2 and 'nope does not exist' in stderr
    code, _, stderr = run_tool('demo', ['--model', tiny_checkpoint, '--images', empty,
                                        '--out', tmp_path / 'o2'])
    assert code == 2 and 'no images' in stderr
    assert not (tmp_path / 'o1').exists() and not (tmp_path / 'o2').exists()
    # Nothing was written before the refusal: no synthetic scenes, no folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ['empty']


def test_demo_refuses_a_file_that_is_no_video_with_one_line(tmp_path):
    # Checked before any node or thread exists: one error line and exit 2 (it used to abort
    # with "terminate called without an active exception" in some runs, exit 134).
    video = tmp_path / 'not_a_video.mp4'
    video.write_bytes(b'not a video at all' * 100)
    result = subprocess.run([sys.executable, str(TOOLS / 'demo.py'), '--video', str(video),
                             '--out', str(tmp_path / 'out')],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith('error: cannot open video') and \
        result.stderr.count('\n') == 1, result.stderr
    assert not (tmp_path / 'out').exists()


def test_demo_skips_unreadable_images_and_lists_every_frame(default_model_cache, tmp_path):
    pytest.importorskip('rclpy')
    import cv2
    images = tmp_path / 'mixed'
    images.mkdir()
    cv2.imwrite(str(images / 'a_blank.png'), np.full((96, 128, 3), 127, np.uint8))
    (images / 'b_corrupt.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    # Threshold 1: every detection is dropped, so the frame has none.
    code, stdout, stderr = run_tool('demo', ['--images', images, '--out', tmp_path / 'out',
                                             '--device', 'cpu', '--score-threshold', '1.0'])
    assert code == 0, stderr
    assert 'skipped b_corrupt.jpg' in stderr
    rows = [line for line in stdout.splitlines() if line.startswith('a_blank')]
    assert len(rows) == 1 and '(no detections)' in rows[0], stdout  # a row all the same
    assert '1 frames (1 unreadable images skipped), 0 detections' in stdout
    assert (tmp_path / 'out' / 'a_blank_detections.jpg').is_file()
