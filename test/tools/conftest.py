"""The model pipeline run once per test session on the tiny Qwen3-VL, one stage per fixture:
prepare_data -> finetune (a few LoRA steps) -> merge_lora (logit check) -> quantize (NF4 on the
CPU) -> detect_folder, each through its ``main()`` as a user would run it. The tiny model is
random: it detects nothing, which is fine here (metrics are tested elsewhere); what is tested is
that every stage produces what the next one needs."""
import shutil

import pytest
from tool_runs import BASE_BUDGET, SIZES, run_tool

from qwen_vl_perception.data.scenes import write_dataset
from qwen_vl_perception.model.pixel_budget import write_pixel_budget
from qwen_vl_perception.trained_prompt import PROMPT_FILE


@pytest.fixture(scope='session')
def work(tmp_path_factory):
    return tmp_path_factory.mktemp('pipeline')


@pytest.fixture(scope='session')
def scenes(work):
    write_dataset(work / 'scenes', 4, seed=2, sizes=SIZES, format=['coco', 'yolo', 'labelme'])
    return work / 'scenes'


@pytest.fixture(scope='session')
def sft(work, scenes):
    out = work / 'sft'
    code, stdout, stderr = run_tool('prepare_data', [
        '--labels', scenes / 'annotations.json', '--out', out, '--val-fraction', '0.25'])
    assert code == 0, stderr
    return out


@pytest.fixture(scope='session')
def trained_base(work, sft, tiny_checkpoint):
    """The tiny checkpoint as a model fine-tuned by the tools is: with its training prompt and
    the pixel budget it was trained at (a small one, unlike the node's default)."""
    base = work / 'trained-base'
    shutil.copytree(tiny_checkpoint, base)
    shutil.copy(sft / PROMPT_FILE, base / PROMPT_FILE)
    write_pixel_budget(base, *BASE_BUDGET)
    return base


@pytest.fixture(scope='session')
def adapter(work, sft, trained_base):
    # No --min-pixels/--max-pixels: the adapter must be trained at the base's own budget.
    out = work / 'adapter'
    code, stdout, stderr = run_tool('finetune', [
        '--base', trained_base, '--dataset', sft, '--out', out, '--max-steps', '3',
        '--lr', '5e-3', '--batch-size', '2', '--grad-accum', '1', '--logging-steps', '1',
        '--device', 'cpu', '--no-progress'])
    assert code == 0, stderr
    return out, stdout


@pytest.fixture(scope='session')
def merged(work, adapter, trained_base):
    out = work / 'merged'
    code, stdout, stderr = run_tool('merge_lora', [
        '--base', trained_base, '--adapter', adapter[0], '--out', out, '--device', 'cpu'])
    assert code == 0, stderr
    return out, stdout


@pytest.fixture(scope='session')
def quantized(work, merged):
    out = work / 'nf4'
    code, stdout, stderr = run_tool('quantize', [
        '--model', merged[0], '--out', out, '--device', 'cpu', '--check-tokens', '4'])
    assert code == 0, stderr
    return out, stdout + stderr


@pytest.fixture(scope='session')
def detections(work, quantized, scenes):
    out = work / 'detect'
    code, stdout, stderr = run_tool('detect_folder', [
        '--model', quantized[0], '--images', scenes / 'images', '--out', out,
        '--max-new-tokens', '8', '--batch-size', '2', '--device', 'cpu'])
    assert code == 0, stderr
    return out, stdout


@pytest.fixture(scope='module')
def default_model_cache(tmp_path_factory):
    from qwen_vl_perception.model.default_model import CACHE_ENV
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp('default-model-cache')))
        yield
