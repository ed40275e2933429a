"""tools/evaluate.py on the pipeline's own detections."""
import json
import shutil
import subprocess
import sys

import pytest

from tool_runs import TOOLS, run_tool

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('peft')
pytest.importorskip('bitsandbytes')


def test_evaluate_reads_the_detections(detections, scenes, work):
    code, stdout, stderr = run_tool('evaluate', [
        '--labels', scenes / 'annotations.json', '--predictions', detections[0] / 'predictions',
        '--out', work / 'metrics'])
    assert code == 0, stderr
    metrics = json.loads((work / 'metrics' / 'metrics.json').read_text())
    assert metrics  # a random tiny model scores ~0; that the tools connect is the point


def test_evaluate_takes_the_run_folder_and_refuses_no_match(detections, scenes, tmp_path):
    labels = scenes / 'annotations.json'
    run_dir = tmp_path / 'run'
    shutil.copytree(detections[0], run_dir)
    code, _, stderr = run_tool('evaluate', [
        '--labels', labels, '--predictions', run_dir, '--out', run_dir / 'metrics'])
    assert code == 0, stderr
    assert 'warning' not in stderr
    code, _, stderr = run_tool('evaluate', [
        '--labels', labels, '--predictions', detections[0] / 'predictions',
        '--out', tmp_path / 'm2'])
    assert code == 0, stderr
    assert (json.loads((run_dir / 'metrics' / 'metrics.json').read_text())
            == json.loads((tmp_path / 'm2' / 'metrics.json').read_text()))
    empty = tmp_path / 'empty'
    empty.mkdir()
    # As a user runs it: its own process, one error line, exit 2, nothing written.
    result = subprocess.run([sys.executable, str(TOOLS / 'evaluate.py'), '--labels', str(labels),
                             '--predictions', str(empty), '--out', str(tmp_path / 'm3')],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert 'none of the 4 labelled images has a prediction file' in result.stderr
    assert result.stderr.count('\n') == 1 and not (tmp_path / 'm3').exists()
    partial = tmp_path / 'partial'
    partial.mkdir()
    shutil.copy(sorted((detections[0] / 'predictions').iterdir())[0], partial)
    code, stdout, stderr = run_tool('evaluate', [
        '--labels', labels, '--predictions', partial, '--out', tmp_path / 'm4'])
    assert code == 0, stderr
    assert 'warning: 3 of 4 labelled images have no prediction file' in stderr
