"""tools/benchmark.py on the CPU: both engines timed, its JSON written; the served path."""
import json

import pytest

from http_servers import AnswerServer, free_port
from tool_runs import run_tool

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('peft')
pytest.importorskip('bitsandbytes')


def test_benchmark_times_both_engines_on_the_cpu_and_writes_its_json(tmp_path):
    out = tmp_path / 'cpu.json'
    results, _, stderr = run_tool('benchmark', [
        '--device', 'cpu', '--tiny', '--batch-sizes', '1', '--new-tokens', '8', '--repeats', '1',
        '--variants', 'bf16', 'article', '--article-runs', '1x8', '--article-repeats', '1',
        '--agreement-tokens', '4', '--cpu-time', '--prefill-check', '--out', out])
    # --cpu-time: this process's CPU seconds, which other jobs on a busy machine do not add to
    # (wall clock there once made a frame look shorter than its own prefill)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert not results['errors'], results['errors']
    assert results['prompt_tokens'] > results['visual_tokens'] > 0
    assert [(run['engine'], run['label'], run['batch'], run['new_tokens'])
            for run in results['runs']] == [
        ('ours', 'float32', 1, 8), ('ours', 'article model (nf4 all, float32 compute)', 1, 8),
        ('generate', 'article model (nf4 all, float32 compute)', 1, 8)]
    assert [run['fused'] for run in results['runs'] if run['engine'] == 'ours'] == [False] * 2
    # No NF4 kernel on the CPU, so no launch shapes tuned (on CUDA: each decoder's picks)
    assert [run['nf4_shapes'] for run in results['runs'] if run['engine'] == 'ours'] == [[]] * 2
    assert [(run['fuse_prefill'], run['prefill_fused']) for run in results['runs']
            if run['engine'] == 'ours'] == [(True, False)] * 2  # asked; CUDA only, as the check
    # The CPU keeps the model's own prefill (the static one is graphed, on CUDA only).
    assert [run['prefill_path'] for run in results['runs'] if run['engine'] == 'ours'] == [
        'model'] * 2
    # float32 on the CPU: our tokens are generate's, unquantized and NF4.
    assert [entry['default']['per_token'] for entry in results['agreement']] == [1.0, 1.0]


def test_served_benchmark_times_each_in_flight_count_and_refuses_a_server_down(tmp_path):
    """``--server --no-local`` against a real HTTP server process (the remote backend tests'
    answer server); the served model's real throughput is tested with vLLM in
    test/backends/test_vllm_backend.py."""
    out = tmp_path / 'served.json'
    with AnswerServer(content='[]') as server:
        results, stdout, _ = run_tool('benchmark', [
            '--server', server.url, '--no-local', '--frames', '3', '--in-flight', '1', '2',
            '--image', '96x64', '--out', out])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert (results['mode'], results['server'], results['server_model']) == (
        'served', server.url, 'default')
    assert [(run['backend'], run['concurrency'], run['frames']) for run in results['runs']] == [
        ('openai', 1, 3), ('openai', 2, 3)]
    assert all(run['frames_per_s'] > 0 for run in results['runs'])
    assert 'robot' in results['instruction']  # no --model: the article's categories
    assert results['agreement'] is None and '| served (openai backend) | 2 |' in stdout
    with pytest.raises(SystemExit) as refused:
        run_tool('benchmark', ['--server', f'http://127.0.0.1:{free_port()}/v1', '--no-local',
                               '--frames', '1'])
    assert str(refused.value).startswith('error: ') and 'cannot connect' in str(refused.value)
    with pytest.raises(SystemExit) as refused:
        run_tool('benchmark', ['--server', f'http://127.0.0.1:{free_port()}/v1', '--no-local',
                               '--frames', '1', '--image', '64x48'])
    assert str(refused.value) == ('error: --image 64x48: scenes need at least 64x64 pixels, '
                                  'got 64x48')


def test_a_frame_no_longer_than_its_prefill_is_an_error_not_a_negative_decode_figure():
    import sys

    from tool_runs import load_tool
    load_tool('benchmark')  # imports tools/benchmarking as the tool does
    timing = sys.modules['benchmarking.timing']
    assert timing.further_token_ms(1.1, 0.1, 11) == pytest.approx(100.0)
    with pytest.raises(ValueError, match='no longer than its prefill'):
        timing.further_token_ms(0.09, 0.1, 11)


def test_a_runs_nf4_shapes_are_its_tuners_picks_without_the_candidates_timings():
    import sys
    from types import SimpleNamespace

    from tool_runs import load_tool
    load_tool('benchmark')
    timing = sys.modules['benchmarking.timing']
    picked = {'widths': [2560], 'in_features': 4096, 'rows': '1-8', 'shape': {'block_n': 16},
              'fold_shape': {'block_n': 16}, 'act_out_fold_shape': None}
    tuner = SimpleNamespace(tuned_shapes=lambda: [dict(picked, timed_ms=[(0.01, {})])])
    decoder = SimpleNamespace(kernel_choices=SimpleNamespace(nf4_matmul=tuner))
    assert timing.nf4_shapes(decoder) == [picked]
    decoder.kernel_choices.nf4_matmul = None  # no NF4 kernel (CPU, or it failed)
    assert timing.nf4_shapes(decoder) == []


def test_an_article_variant_without_runs_and_a_malformed_pair_are_refused(capsys):
    """The article variant times only its ``--article-runs``: with none it would time nothing
    and write a result without one ``generate`` run, so it is refused, as a pair that is not
    BATCHxTOKENS (or WIDTHxHEIGHT) of positive integers is."""
    import sys

    from tool_runs import load_tool
    tool = load_tool('benchmark')
    parse_args = sys.modules['benchmarking.arguments'].parse_args
    for argv, message in [
            (['--variants', 'nf4', 'article', '--article-runs'],
             '--variants article needs at least one --article-runs'),
            (['--article-runs', '1x150', '8by80'], "'8by80' is not AxB"),
            (['--bnb-check', '0x80'], "'0x80' is not AxB"),
            (['--image', '640x480x3'], "'640x480x3' is not AxB")]:
        with pytest.raises(SystemExit) as refused:
            parse_args(argv, tool.__doc__)
        assert refused.value.code == 2
        assert message in capsys.readouterr().err
    # Without the article variant no --article-runs is needed; the default has three.
    assert parse_args(['--variants', 'nf4', '--article-runs'], tool.__doc__).article_runs == []
    assert parse_args([], tool.__doc__).article_runs == ['1x150', '1x80', '8x80']
