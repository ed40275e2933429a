"""tools/detect_folder.py: predictions, annotated images and a summary for an image folder."""
import json
import shutil
from pathlib import Path

import pytest

from tool_runs import load_tool, run_tool

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('peft')
pytest.importorskip('bitsandbytes')

from qwen_vl_perception.detector import DetectionSettings, detections_from_text  # noqa: E402
from qwen_vl_perception.detector import prepare_settings  # noqa: E402
from qwen_vl_perception.data.image_folder import list_images, natural_key  # noqa: E402
from qwen_vl_perception.data.labels import load_predictions  # noqa: E402


def test_detect_folder_writes_predictions_images_and_summary(detections, scenes):
    out, stdout = detections
    images = sorted(path.name for path in (scenes / 'images').glob('*.png'))
    predictions = load_predictions(out / 'predictions')
    assert sorted(predictions) == images
    assert sorted(p.name for p in (out / 'annotated').iterdir()) == [
        name.replace('.png', '_detections.jpg') for name in images]
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['processed'] == len(images) and summary['skipped'] == []
    assert summary['settings']['categories'] == ['ball', 'box', 'cone', 'ring']
    assert summary['quantization'] == 'nf4'
    assert [record['image'] for record in summary['per_image']] == images
    assert summary['timing']['per_image_s'] > 0


def test_folder_images_come_in_natural_order(tmp_path):
    for name in ('img10.png', 'img2.JPG', 'IMG1.jpeg', 'img3.webp', 'img4.bmp', 'notes.txt',
                 'img5.gif'):
        (tmp_path / name).write_bytes(b'')
    (tmp_path / 'img0.png').mkdir()
    assert [p.name for p in list_images(tmp_path)] == [
        'IMG1.jpeg', 'img2.JPG', 'img3.webp', 'img4.bmp', 'img10.png']
    assert sorted(['a10b2', 'a2b10', 'a2b9'], key=natural_key) == ['a2b9', 'a2b10', 'a10b2']


def test_detect_folder_prints_each_object_with_its_attributes():
    tool = load_tool('detect_folder')
    prepared = prepare_settings(DetectionSettings(categories=('cup',), describe=True))
    text = '```json\n[{"bbox_2d": [100, 200, 300, 400], "label": "cup", "color": "red"}]\n```'
    frame = detections_from_text(text, prepared, (640, 480))
    frame.seconds = 1.5
    printed = tool.describe_frame(Path('img2.png'), frame, 1)
    assert printed == 'img2.png: 1 object(s) in 1.50 s\n  #0 cup 1.00 [64, 96, 192, 192] color=red'
    assert tool.output_names([Path('a.png'), Path('a.jpg'), Path('b.png')]) == [
        'a.png', 'a.jpg', 'b']


def test_detect_folder_overwrite_keeps_only_this_runs_outputs(detections, quantized, scenes,
                                                              tmp_path):
    run_dir = tmp_path / 'run'
    shutil.copytree(detections[0], run_dir)
    (run_dir / 'notes.txt').write_text('mine')
    one = tmp_path / 'one'
    one.mkdir()
    first = sorted((scenes / 'images').glob('*.png'))[0]
    shutil.copy(first, one / first.name)
    code, _, stderr = run_tool('detect_folder', [
        '--model', quantized[0], '--images', one, '--out', run_dir, '--overwrite',
        '--max-new-tokens', '4', '--device', 'cpu', '--quiet'])
    assert code == 0, stderr
    assert sorted(load_predictions(run_dir / 'predictions')) == [first.name]
    assert [p.name for p in (run_dir / 'annotated').iterdir()] == [
        first.stem + '_detections.jpg']
    assert (run_dir / 'notes.txt').read_text() == 'mine'  # not the tool's: kept
