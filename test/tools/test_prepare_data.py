"""tools/prepare_data.py: labels to LLaMA-Factory SFT data the node's parser reads back."""
import json
from pathlib import Path

import pytest

from tool_runs import run_tool

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('peft')
pytest.importorskip('bitsandbytes')

from qwen_vl_perception.categories import LabelMatcher  # noqa: E402
from qwen_vl_perception.geometry import to_grid  # noqa: E402
from qwen_vl_perception.data.labels import load_labels  # noqa: E402
from qwen_vl_perception.parsing import parse_objects  # noqa: E402
from qwen_vl_perception.prompt import IMAGE_PLACEHOLDER, PromptBuilder  # noqa: E402
from qwen_vl_perception.data.sft_data import read_sft_dataset  # noqa: E402
from qwen_vl_perception.trained_prompt import PROMPT_FILE  # noqa: E402


def test_prepare_data_writes_llama_factory_files(sft):
    info = json.loads((sft / 'dataset_info.json').read_text())
    assert info['detection'] == {
        'file_name': 'dataset.json', 'formatting': 'sharegpt',
        'columns': {'messages': 'messages', 'images': 'images'},
        'tags': {'role_tag': 'role', 'content_tag': 'content', 'user_tag': 'user',
                 'assistant_tag': 'assistant'}}
    assert info['detection_val']['file_name'] == 'dataset_val.json'
    train = json.loads((sft / 'dataset.json').read_text())
    val = json.loads((sft / 'dataset_val.json').read_text())
    assert (len(train), len(val)) == (3, 1)
    for sample in train + val:
        assert [turn['role'] for turn in sample['messages']] == ['user', 'assistant']
        assert sample['messages'][0]['content'].count(IMAGE_PLACEHOLDER) == 1
        assert len(sample['images']) == 1 and (sft / sample['images'][0]).is_file()
    prompt = json.loads((sft / PROMPT_FILE).read_text())
    assert prompt['categories'] == ['ball', 'box', 'cone', 'ring']
    assert train[0]['messages'][0]['content'] == prompt['instruction'] + IMAGE_PLACEHOLDER


@pytest.mark.parametrize('label_format,labels', [
    ('coco', 'annotations.json'), ('yolo', '.'), ('labelme', 'images')])
def test_prepared_answers_parse_back_to_the_grid_boxes(scenes, tmp_path, label_format, labels):
    out = tmp_path / 'sft'
    code, _, stderr = run_tool('prepare_data', [
        '--labels', scenes / labels, '--format', label_format, '--out', out, '--describe',
        '--attributes', 'color', 'shape', '--link'])
    assert code == 0, stderr
    truth = {image.name: image for image in load_labels(scenes / labels, label_format)}
    prompt = PromptBuilder(['ball', 'box', 'cone', 'ring'], describe=True,
                           attributes=('color', 'shape'))
    samples = read_sft_dataset(out)
    assert len(samples) == len(truth)
    for sample in samples:
        assert sample.instruction == prompt.instruction
        assert Path(sample.image_path).is_symlink()
        image = truth[Path(sample.image_path).name]
        parsed = parse_objects(sample.answer, LabelMatcher(prompt.categories),
                               attribute_keys=prompt.attributes)
        assert parsed.invalid == 0 and not parsed.truncated
        expected = sorted((obj.label, to_grid(obj.box, (image.width, image.height)),
                           obj.attributes.get('color'), obj.attributes.get('shape'))
                          for obj in image.objects)
        got = sorted((obj.label, tuple(int(v) for v in obj.box), obj.attributes.get('color'),
                      obj.attributes.get('shape')) for obj in parsed.objects)
        assert got == expected


def test_prepare_data_keeps_only_the_asked_categories(scenes, tmp_path):
    code, stdout, stderr = run_tool('prepare_data', [
        '--labels', scenes / 'annotations.json', '--out', tmp_path / 'sft',
        '--categories', 'Ball,box', '--skip-empty'])
    assert code == 0, stderr
    samples = read_sft_dataset(tmp_path / 'sft')
    for sample in samples:
        assert '"ball, box"' in sample.instruction.lower()
        labels = {obj.label for obj in parse_objects(
            sample.answer, LabelMatcher(['ball', 'box', 'cone', 'ring'])).objects}
        assert labels and labels <= {'ball', 'box'}
    assert 'left out objects' in stderr


def test_read_sft_dataset_refuses_bad_samples(tmp_path):
    good = {'messages': [{'role': 'user', 'content': 'find cups<image>'},
                         {'role': 'assistant', 'content': '[]'}], 'images': ['a.png']}
    cases = {
        'two tags': dict(good, messages=[{'role': 'user', 'content': '<image>x<image>'},
                                         good['messages'][1]]),
        'system turn': dict(good, messages=[{'role': 'system', 'content': 's'}]
                            + good['messages']),
        'two images': dict(good, images=['a.png', 'b.png']),
    }
    for reason, sample in cases.items():
        path = tmp_path / 'data.json'
        path.write_text(json.dumps([good, sample]))
        with pytest.raises(ValueError, match='sample 1'):
            read_sft_dataset(path)
    sharegpt = {'conversations': [{'from': 'human', 'value': '<image>find cups'},
                                  {'from': 'gpt', 'value': '[]'}], 'images': ['/x/a.png']}
    path.write_text(json.dumps([sharegpt]))
    sample, = read_sft_dataset(path)
    assert (sample.instruction, sample.image_path) == ('find cups', '/x/a.png')


def test_prepare_data_refuses_categories_that_match_no_label(scenes, tmp_path):
    code, _, stderr = run_tool('prepare_data', [
        '--labels', scenes / 'annotations.json', '--out', tmp_path / 'none',
        '--categories', '杯子'])
    assert code == 2 and 'no labelled object is one of the categories (杯子)' in stderr
    assert not (tmp_path / 'none').exists()
    truth = load_labels(scenes / 'annotations.json')
    total = sum(len(image.objects) for image in truth)
    balls = sum(obj.label == 'ball' for image in truth for obj in image.objects)
    code, _, stderr = run_tool('prepare_data', [
        '--labels', scenes / 'annotations.json', '--out', tmp_path / 'some',
        '--categories', 'ball'])
    assert code == 0, stderr
    assert f'({total - balls} of {total} objects)' in stderr and 'warning:' in stderr
