"""tools/benchmark.py on the CPU: both engines timed, its JSON written."""
import json

import pytest

from tool_runs import run_tool

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('peft')
pytest.importorskip('bitsandbytes')


def test_benchmark_times_both_engines_on_the_cpu_and_writes_its_json(tmp_path):
    out = tmp_path / 'cpu.json'
    results, _, stderr = run_tool('benchmark', [
        '--device', 'cpu', '--tiny', '--batch-sizes', '1', '--new-tokens', '4', '--repeats', '1',
        '--variants', 'bf16', 'article', '--article-runs', '1x4', '--article-repeats', '1',
        '--agreement-tokens', '4', '--out', out])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert not results['errors'], results['errors']
    assert results['prompt_tokens'] > results['visual_tokens'] > 0
    assert [(run['engine'], run['label'], run['batch'], run['new_tokens'])
            for run in results['runs']] == [
        ('ours', 'float32', 1, 4), ('ours', 'article model (nf4 all, float32 compute)', 1, 4),
        ('generate', 'article model (nf4 all, float32 compute)', 1, 4)]
    assert [run['fused'] for run in results['runs'] if run['engine'] == 'ours'] == [False] * 2
    # float32 on the CPU: our tokens are generate's, unquantized and NF4.
    assert [entry['default']['per_token'] for entry in results['agreement']] == [1.0, 1.0]
