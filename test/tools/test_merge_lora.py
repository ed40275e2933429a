"""tools/merge_lora.py: base + adapter (PEFT or LLaMA-Factory), checked by logits."""
import json
import shutil

import pytest

from tool_runs import BASE_BUDGET, run_tool

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('peft')
pytest.importorskip('bitsandbytes')

from qwen_vl_perception.model.pixel_budget import read_pixel_budget  # noqa: E402
from qwen_vl_perception.trained_prompt import PROMPT_FILE  # noqa: E402


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
