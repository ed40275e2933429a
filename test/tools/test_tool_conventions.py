"""What every pipeline tool does alike: refusals, output folders, the category rule, the
``default`` model, no progress bars, help with a 4B example."""
import json
import os
import shutil

import pytest

from tool_runs import load_tool, run_tool

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('peft')
pytest.importorskip('bitsandbytes')

from qwen_vl_perception.data.sft_data import read_sft_dataset  # noqa: E402


def test_tools_refuse_a_missing_model_folder(tmp_path, scenes):
    missing = tmp_path / 'no-model'
    code, _, stderr = run_tool('quantize', ['--model', missing, '--out', tmp_path / 'q'])
    assert code == 2 and f'{missing} does not exist' in stderr and 'Traceback' not in stderr
    code, _, stderr = run_tool('detect_folder', [
        '--model', missing, '--images', scenes / 'images', '--out', tmp_path / 'd'])
    assert code == 2 and f'{missing} does not exist' in stderr and 'Traceback' not in stderr
    code, _, stderr = run_tool('merge_lora', [
        '--base', missing, '--adapter', tmp_path, '--out', tmp_path / 'm'])
    assert code == 2 and 'does not exist' in stderr
    assert not any((tmp_path / name).exists() for name in ('q', 'd', 'm'))


def test_tools_refuse_a_non_empty_output_folder(sft, tiny_checkpoint, scenes, tmp_path):
    out = tmp_path / 'full'
    out.mkdir()
    (out / 'keep.txt').write_text('x')
    code, _, stderr = run_tool('prepare_data', ['--labels', scenes / 'annotations.json',
                                                '--out', out])
    assert code == 2 and '--overwrite' in stderr
    code, _, stderr = run_tool('finetune', ['--base', tiny_checkpoint, '--dataset', sft,
                                            '--out', out])
    assert code == 2 and '--overwrite' in stderr
    code, _, stderr = run_tool('detect_folder', [
        '--model', tiny_checkpoint, '--images', scenes / 'images', '--out', out,
        '--categories', 'ball'])
    assert code == 2 and '--overwrite' in stderr


@pytest.mark.parametrize('tool', ['prepare_data', 'finetune', 'merge_lora', 'quantize',
                                  'detect_folder'])
def test_help_shows_a_4b_example(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool(tool).main(['--help'])
    assert exit_info.value.code == 0
    assert 'qwen3-vl-4b' in capsys.readouterr().out.lower()


def test_a_failed_run_removes_only_what_it_created(scenes, tmp_path):
    bad = tmp_path / 'bad.json'
    bad.write_text('{"images": 3}')
    code, _, stderr = run_tool('evaluate', [
        '--labels', bad, '--predictions', scenes, '--out', tmp_path / 'new' / 'metrics'])
    assert code == 2 and not (tmp_path / 'new').exists()
    mine = tmp_path / 'mine'
    mine.mkdir()
    code, _, stderr = run_tool('evaluate', [
        '--labels', bad, '--predictions', scenes, '--out', mine])
    assert code == 2 and mine.is_dir()  # the user's folder stays
    # A failure after the tool began writing (every image file is missing: images/ was made).
    labels = json.loads((scenes / 'annotations.json').read_text())
    for image in labels['images']:
        image['file_name'] = 'nowhere/' + image['file_name']
    broken = tmp_path / 'broken.json'
    broken.write_text(json.dumps(labels))
    keep = tmp_path / 'keep'
    keep.mkdir()
    (keep / 'old.txt').write_text('x')
    code, _, stderr = run_tool('prepare_data', ['--labels', broken, '--out', keep,
                                                '--overwrite'])
    assert code == 2 and 'no sample left' in stderr
    assert sorted(p.name for p in keep.iterdir()) == ['old.txt']


def test_categories_follow_the_nodes_rule_in_every_tool(scenes, quantized, tmp_path):
    from qwen_vl_perception.categories import normalize_categories
    with pytest.raises(ValueError) as node_error:
        normalize_categories([''])  # what the node refuses categories: [''] with
    message = str(node_error.value)
    runs = {
        'detect_folder': ['--model', quantized[0], '--images', scenes / 'images',
                          '--out', tmp_path / 'd', '--categories', ''],
        'prepare_data': ['--labels', scenes / 'annotations.json', '--out', tmp_path / 'p',
                         '--categories', ''],
        'evaluate': ['--labels', scenes / 'annotations.json', '--predictions', scenes,
                     '--out', tmp_path / 'e', '--categories', ''],
        'demo': ['--model', quantized[0], '--images', scenes / 'images', '--out',
                 tmp_path / 'demo', '--categories', ''],
    }
    for tool, args in runs.items():
        code, _, stderr = run_tool(tool, args)
        assert code == 2 and stderr == f'error: invalid --categories: {message}\n', tool
    assert not any(tmp_path.iterdir())


def test_every_model_option_takes_default(default_model_cache, scenes, sft, tmp_path):
    one = tmp_path / 'one'
    one.mkdir()
    first = sorted((scenes / 'images').glob('*.png'))[0]
    shutil.copy(first, one / first.name)
    code, stdout, stderr = run_tool('detect_folder', [
        '--model', 'default', '--images', one, '--out', tmp_path / 'd',
        '--max-new-tokens', '4', '--device', 'cpu', '--quiet'])
    assert code == 0, stderr
    summary = json.loads((tmp_path / 'd' / 'summary.json').read_text())
    assert summary['quantization'] == 'nf4' and summary['settings']['categories'] == [
        'ball', 'box', 'cone', 'ring']
    # The float32 form is taken as the base of the other tools (each stops at a later check).
    for tool, args, reason in (
            ('finetune', ['--base', 'default', '--dataset', sft, '--out', tmp_path / 'f',
                          '--min-pixels', '0'], 'min_pixels'),
            ('merge_lora', ['--base', 'default', '--adapter', tmp_path / 'no-adapter',
                            '--out', tmp_path / 'm'], 'no-adapter'),
            ('quantize', ['--model', 'default', '--out', tmp_path / 'q',
                          '--check-tokens', '0'], '--check-tokens')):
        code, _, stderr = run_tool(tool, args)
        assert code == 2 and reason in stderr and 'default does not exist' not in stderr, tool


def test_model_loading_shows_no_progress_bars(quantized):
    # "Loading weights" bars on every start are noise in the tools' output.
    assert 'Loading weights' not in quantized[1]


def test_overwrite_replaces_links_instead_of_writing_through_them(scenes, tmp_path):
    out = tmp_path / 'sft2'
    labels = ['--labels', scenes / 'annotations.json', '--out', out]
    assert run_tool('prepare_data', labels)[0] == 0
    elsewhere = tmp_path / 'elsewhere'
    (elsewhere / 'images').mkdir(parents=True)
    for name in ('dataset.json', 'dataset_info.json'):
        (elsewhere / name).write_text('precious\n')
    (out / 'dataset.json').unlink()
    (out / 'dataset.json').symlink_to(elsewhere / 'dataset.json')
    (out / 'dataset_info.json').unlink()
    os.link(elsewhere / 'dataset_info.json', out / 'dataset_info.json')
    shutil.rmtree(out / 'images')
    (out / 'images').symlink_to(elsewhere / 'images', target_is_directory=True)
    # A run that fails puts the links back ...
    broken = json.loads((scenes / 'annotations.json').read_text())
    for image in broken['images']:
        image['file_name'] = 'nowhere/' + image['file_name']
    (tmp_path / 'broken.json').write_text(json.dumps(broken))
    code, _, stderr = run_tool('prepare_data', ['--labels', tmp_path / 'broken.json',
                                                '--out', out, '--overwrite'])
    assert code == 2 and 'no sample left' in stderr
    assert os.readlink(out / 'dataset.json') == str(elsewhere / 'dataset.json')
    assert (out / 'images').is_symlink()
    # ... and one that succeeds writes files of its own, not through them.
    code, _, stderr = run_tool('prepare_data', labels + ['--overwrite'])
    assert code == 0, stderr
    for name in ('dataset.json', 'dataset_info.json'):
        assert (elsewhere / name).read_text() == 'precious\n'
        assert not (out / name).is_symlink() and (out / name).stat().st_nlink == 1
    assert list((elsewhere / 'images').iterdir()) == []
    assert not (out / 'images').is_symlink() and len(list((out / 'images').iterdir())) == 4
    assert len(read_sft_dataset(out)) == 4
