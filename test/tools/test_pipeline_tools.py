"""The model pipeline tools end to end on the tiny Qwen3-VL, plus their refusals.

prepare_data -> finetune (a few LoRA steps) -> merge_lora (logit check) -> quantize (NF4 on the
CPU) -> detect_folder -> evaluate, each run through its ``main()`` as a user would run it.
The tiny model is random: it detects nothing, which is fine here (metrics are tested
elsewhere); what is tested is that every stage produces what the next one needs.
"""
import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from locations import REPO_ROOT

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('peft')
pytest.importorskip('bitsandbytes')

from qwen_vl_perception.categories import LabelMatcher  # noqa: E402
from qwen_vl_perception.detector import DetectionSettings, detections_from_text  # noqa: E402
from qwen_vl_perception.detector import prepare_settings  # noqa: E402
from qwen_vl_perception.geometry import to_grid  # noqa: E402
from qwen_vl_perception.data.image_folder import list_images, natural_key  # noqa: E402
from qwen_vl_perception.data.labels import load_labels, load_predictions  # noqa: E402
from qwen_vl_perception.model.configs import tiny_config  # noqa: E402
from qwen_vl_perception.pipeline.lora import (  # noqa: E402
    AdapterError, read_adapter, select_target_modules, tied_module_problems)
from qwen_vl_perception.model.pixel_budget import read_pixel_budget  # noqa: E402
from qwen_vl_perception.model.pixel_budget import write_pixel_budget  # noqa: E402
from qwen_vl_perception.parsing import parse_objects  # noqa: E402
from qwen_vl_perception.prompt import IMAGE_PLACEHOLDER, PromptBuilder  # noqa: E402
from qwen_vl_perception.data.scenes import write_dataset  # noqa: E402
from qwen_vl_perception.data.sft_data import read_sft_dataset  # noqa: E402
from qwen_vl_perception.trained_prompt import PROMPT_FILE  # noqa: E402

TOOLS = REPO_ROOT / 'tools'
SIZES = [(96, 72), (72, 96)]
BASE_BUDGET = (1024, 4096)  # a handful of visual tokens


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f'tool_{name}', TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name, args):
    """Run a tool's main() in-process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = load_tool(name).main([str(arg) for arg in args])
    return code, out.getvalue(), err.getvalue()


def linear4bit_count(model):
    import bitsandbytes as bnb
    return sum(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())


# --------------------------------------------------------------------------------------------
# The pipeline, one stage per fixture


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    return tmp_path_factory.mktemp('pipeline')


@pytest.fixture(scope='module')
def scenes(work):
    write_dataset(work / 'scenes', 4, seed=2, sizes=SIZES, format=['coco', 'yolo', 'labelme'])
    return work / 'scenes'


@pytest.fixture(scope='module')
def sft(work, scenes):
    out = work / 'sft'
    code, stdout, stderr = run_tool('prepare_data', [
        '--labels', scenes / 'annotations.json', '--out', out, '--val-fraction', '0.25'])
    assert code == 0, stderr
    return out


@pytest.fixture(scope='module')
def trained_base(work, sft, tiny_checkpoint):
    """The tiny checkpoint as a model fine-tuned by the tools is: with its training prompt and
    the pixel budget it was trained at (a small one, unlike the node's default)."""
    base = work / 'trained-base'
    shutil.copytree(tiny_checkpoint, base)
    shutil.copy(sft / PROMPT_FILE, base / PROMPT_FILE)
    write_pixel_budget(base, *BASE_BUDGET)
    return base


@pytest.fixture(scope='module')
def adapter(work, sft, trained_base):
    # No --min-pixels/--max-pixels: the adapter must be trained at the base's own budget.
    out = work / 'adapter'
    code, stdout, stderr = run_tool('finetune', [
        '--base', trained_base, '--dataset', sft, '--out', out, '--max-steps', '3',
        '--lr', '5e-3', '--batch-size', '2', '--grad-accum', '1', '--logging-steps', '1',
        '--device', 'cpu', '--no-progress'])
    assert code == 0, stderr
    return out, stdout


@pytest.fixture(scope='module')
def merged(work, adapter, trained_base):
    out = work / 'merged'
    code, stdout, stderr = run_tool('merge_lora', [
        '--base', trained_base, '--adapter', adapter[0], '--out', out, '--device', 'cpu'])
    assert code == 0, stderr
    return out, stdout


@pytest.fixture(scope='module')
def quantized(work, merged):
    out = work / 'nf4'
    code, stdout, stderr = run_tool('quantize', [
        '--model', merged[0], '--out', out, '--device', 'cpu', '--check-tokens', '4'])
    assert code == 0, stderr
    return out, stdout + stderr


@pytest.fixture(scope='module')
def detections(work, quantized, scenes):
    out = work / 'detect'
    code, stdout, stderr = run_tool('detect_folder', [
        '--model', quantized[0], '--images', scenes / 'images', '--out', out,
        '--max-new-tokens', '8', '--batch-size', '2', '--device', 'cpu'])
    assert code == 0, stderr
    return out, stdout


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


def test_finetune_writes_a_peft_adapter(adapter, tiny_checkpoint):
    out, stdout = adapter
    for name in ('adapter_config.json', 'adapter_model.safetensors', 'tokenizer.json',
                 'preprocessor_config.json', 'chat_template.jinja', PROMPT_FILE):
        assert (out / name).is_file(), name
    log = json.loads((out / 'training_log.json').read_text())
    result = log['result']
    assert result['steps'] == 3
    assert np.isfinite(result['train_loss']) and np.isfinite(result['eval_loss'])
    assert all(np.isfinite(entry['loss']) for entry in result['log_history'] if 'loss' in entry)
    config = json.loads((out / 'adapter_config.json').read_text())
    assert config['r'] == 8 and config['lora_alpha'] == 16
    info = read_adapter(out)  # the merge tool's own reader accepts it
    assert info.weight_keys and all('language_model.layers' in key for key in info.weight_keys)
    # Trained at the base's own budget (no option given), not at the node's default.
    preprocessor = json.loads((out / 'preprocessor_config.json').read_text())
    assert preprocessor['size'] == {'shortest_edge': 1024, 'longest_edge': 4096}
    assert log['config']['min_pixels'] == 1024 and log['config']['max_pixels'] == 4096
    assert 'training loss' in stdout and 'fed at 1024-4096 pixels' in stdout


def test_merge_matches_base_plus_adapter_and_reloads(merged, tiny_checkpoint):
    out, stdout = merged
    assert 'max |merged - base+adapter|' in stdout and 'sizes: base' in stdout
    log = json.loads((out / 'merge_log.json').read_text())
    check = log['check']
    assert log['check_passed'] and check['max_abs_diff'] <= check['tolerance']
    # The adapter moves the logits by more than the tolerance, so an unmerged base (or a
    # merge that lost the adapter) would have failed this check.
    assert log['check_conclusive'] and check['adapter_effect'] > check['tolerance']
    assert log['tied_embeddings_kept'] is True
    model = transformers.AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == 'Qwen3VLForConditionalGeneration'
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert not any('lora' in name for name, _ in model.named_parameters())
    base = transformers.AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    changed = [name for name, param in model.named_parameters()
               if not torch.equal(param.float(), base.get_parameter(name).to(
                   torch.bfloat16).float())]
    assert changed and all('language_model.layers' in name for name in changed)
    for name in ('tokenizer.json', 'chat_template.jinja', 'preprocessor_config.json',
                 'video_preprocessor_config.json', PROMPT_FILE):
        assert (out / name).is_file(), name
    assert read_pixel_budget(out) == BASE_BUDGET


def test_quantize_reloads_as_4bit_and_generates(quantized, merged):
    out, stdout = quantized
    config = json.loads((out / 'config.json').read_text())['quantization_config']
    assert config['bnb_4bit_quant_type'] == 'nf4' and config['bnb_4bit_use_double_quant']
    assert config['bnb_4bit_compute_dtype'] == 'float16'
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        out, dtype=torch.bfloat16, device_map='cpu')
    # Every linear layer but the tied lm_head, as in the article: 2 x 7 in the language
    # model, 2 x 4 in the vision blocks, 2 + 2 in the mergers.
    assert linear4bit_count(model) == 26
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == \
        torch.bfloat16
    log = json.loads((out / 'quantize_log.json').read_text())
    assert log['check_new_tokens'] >= 1 and log['linear4bit_layers'] == 26
    assert 'size:' in stdout and 'check answer' in stdout
    assert (out / 'tokenizer.json').is_file() and (out / PROMPT_FILE).is_file()
    assert read_pixel_budget(out) == BASE_BUDGET


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


def test_evaluate_reads_the_detections(detections, scenes, work):
    code, stdout, stderr = run_tool('evaluate', [
        '--labels', scenes / 'annotations.json', '--predictions', detections[0] / 'predictions',
        '--out', work / 'metrics'])
    assert code == 0, stderr
    metrics = json.loads((work / 'metrics' / 'metrics.json').read_text())
    assert metrics  # a random tiny model scores ~0; that the tools connect is the point


# --------------------------------------------------------------------------------------------
# LLaMA-Factory adapters and refusals


def _adapter_copy(source, target, **config_changes):
    shutil.copytree(source, target)
    path = target / 'adapter_config.json'
    config = json.loads(path.read_text())
    config.update(config_changes)
    path.write_text(json.dumps(config))
    return target


def test_merge_accepts_a_llama_factory_adapter_folder(adapter, tiny_checkpoint, tmp_path):
    # LLaMA-Factory names every targeted module in a list and keeps its run files beside.
    names = [name for name, module in transformers.AutoModelForImageTextToText.from_pretrained(
        tiny_checkpoint).named_modules()
        if isinstance(module, torch.nn.Linear) and '.language_model.layers.' in name]
    run_dir = _adapter_copy(adapter[0], tmp_path / 'saves/Qwen3-VL-4B-Instruct/lora/train_1',
                            target_modules=names, base_model_name_or_path='Qwen/Qwen3-VL-4B')
    for name in ('trainer_state.json', 'all_results.json', PROMPT_FILE, 'training_log.json'):
        (run_dir / name).unlink(missing_ok=True)
    (run_dir / 'trainer_state.json').write_text('{"global_step": 3}')
    (run_dir / 'all_results.json').write_text('{"train_loss": 11.9}')
    code, stdout, stderr = run_tool('merge_lora', [
        '--base', tiny_checkpoint, '--adapter', run_dir, '--out', tmp_path / 'merged',
        '--dtype', 'float32', '--device', 'cpu', '--max-pixels', '8192'])
    assert code == 0, stderr
    log = json.loads((tmp_path / 'merged' / 'merge_log.json').read_text())
    assert log['check_passed'] and log['check']['max_abs_diff'] < 1e-3
    assert log['pixel_budget'] == [1024, 8192]
    code, _, stderr = run_tool('merge_lora', [
        '--base', tiny_checkpoint, '--adapter', tmp_path / 'saves', '--out', tmp_path / 'x'])
    assert code == 2 and 'adapters found below it' in stderr and 'train_1' in stderr


def test_merge_fails_when_the_logits_differ_beyond_the_tolerance(adapter, tiny_checkpoint,
                                                                 tmp_path):
    # bf16 rounding makes merged and unmerged logits differ a little; a tolerance below that
    # must fail the check: exit code 1, files kept, the log saying so.
    code, _, stderr = run_tool('merge_lora', [
        '--base', tiny_checkpoint, '--adapter', adapter[0], '--out', tmp_path / 'merged',
        '--device', 'cpu', '--tolerance', '1e-9'])
    assert code == 1 and 'does not reproduce base+adapter' in stderr
    log = json.loads((tmp_path / 'merged' / 'merge_log.json').read_text())
    assert log['check_passed'] is False and log['check']['max_abs_diff'] > 1e-9


def test_merge_refuses_a_quantized_base(quantized, adapter, tmp_path):
    code, _, stderr = run_tool('merge_lora', [
        '--base', quantized[0], '--adapter', adapter[0], '--out', tmp_path / 'out'])
    assert code == 2
    assert 'quantized (nf4)' in stderr and 'tools/quantize.py' in stderr
    assert 'Traceback' not in stderr and not (tmp_path / 'out').exists()


@pytest.mark.parametrize('changes', [
    {'target_modules': ['q_proj', 'lm_head']},
    {'target_modules': '.*(q_proj|embed_tokens)'},
    {'modules_to_save': ['lm_head']},
])
def test_merge_refuses_adapters_on_the_tied_lm_head(adapter, tiny_checkpoint, tmp_path,
                                                    changes):
    bad = _adapter_copy(adapter[0], tmp_path / 'bad', **changes)
    code, _, stderr = run_tool('merge_lora', [
        '--base', tiny_checkpoint, '--adapter', bad, '--out', tmp_path / 'out'])
    assert code == 2 and 'peft#2018' in stderr and 'Traceback' not in stderr


def test_tied_module_problems_reads_weights_too():
    assert tied_module_problems({'target_modules': ['q_proj', 'v_proj']}) == []
    assert tied_module_problems({'target_modules': '^(?!.*visual).*(?:q_proj|v_proj).*'}) == []
    problems = tied_module_problems(
        {'target_modules': ['q_proj']},
        ['base_model.model.lm_head.lora_A.weight', 'base_model.model.x.q_proj.lora_A.weight'])
    assert problems == ['its weights hold tensors for lm_head']


def test_lora_targets_are_the_language_model_unless_asked():
    with torch.device('meta'):
        model = transformers.Qwen3VLForConditionalGeneration(
            transformers.Qwen3VLConfig(**tiny_config()))
    _, language = select_target_modules(model, ['language'])
    assert len(language) == 14 and all('.language_model.layers.' in n for n in language)
    regex, both = select_target_modules(model, ['language', 'vision'])
    assert len(both) == 22 and not any('merger' in name for name in both)
    _, one = select_target_modules(model, ['layers.1.mlp.down_proj'])
    assert one == ['model.language_model.layers.1.mlp.down_proj']
    for refused in (['lm_head'], ['embed_tokens'], ['no_such_layer']):
        with pytest.raises(AdapterError):
            select_target_modules(model, refused)


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


# --------------------------------------------------------------------------------------------
# Data round trip and folder handling


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


# --------------------------------------------------------------------------------------------
# No silent wrong results (issue #11)


def _scaled_adapter(source, target, factor):
    """A copy of an adapter whose LoRA B matrices are multiplied by ``factor`` (0: a LoRA
    that changes nothing, as an untrained one)."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(source, target)
    path = target / 'adapter_model.safetensors'
    tensors = load_file(str(path))
    save_file({key: value * factor if 'lora_B' in key else value
               for key, value in tensors.items()}, str(path), metadata={'format': 'pt'})
    return target


def test_merge_check_at_the_default_dtype_tells_merged_from_base(adapter, trained_base,
                                                                 tmp_path):
    # An adapter whose effect is below what bf16 rounding can do to the logits: compared in
    # bf16 the check could not tell merged from base; compared in float32 it can.
    weak = _scaled_adapter(adapter[0], tmp_path / 'weak', 0.01)
    code, stdout, stderr = run_tool('merge_lora', [
        '--base', trained_base, '--adapter', weak, '--out', tmp_path / 'merged',
        '--device', 'cpu'])
    assert code == 0, stderr
    log = json.loads((tmp_path / 'merged' / 'merge_log.json').read_text())
    check = log['check']
    assert log['dtype'] == 'bfloat16' and log['check_passed'] and log['check_conclusive']
    assert check['max_abs_diff'] <= check['tolerance'] < check['adapter_effect']
    # A comparison in bf16 needed a tolerance of 10 % of the logit scale: inconclusive here.
    assert check['adapter_effect'] < 0.1 * max(1.0, check['logit_scale'])
    assert 'cannot tell' not in stdout + stderr
    # An adapter that changes nothing cannot be checked: the merge fails, saying so.
    zero = _scaled_adapter(adapter[0], tmp_path / 'zero', 0.0)
    code, _, stderr = run_tool('merge_lora', [
        '--base', trained_base, '--adapter', zero, '--out', tmp_path / 'merged0',
        '--device', 'cpu'])
    assert code == 1 and 'cannot tell the merged model' in stderr


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


@pytest.fixture(scope='module')
def default_model_cache(tmp_path_factory):
    from qwen_vl_perception.model.default_model import CACHE_ENV
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp('default-model-cache')))
        yield


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


# --------------------------------------------------------------------------------------------
# The demo (camera, node and recorder over DDS in one process)


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
