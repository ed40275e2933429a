"""tools/finetune.py: a PEFT adapter on the language model, and the LoRA target rules."""
import json

import numpy as np
import pytest


torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('peft')
pytest.importorskip('bitsandbytes')

from qwen_vl_perception.model.configs import tiny_config  # noqa: E402
from qwen_vl_perception.pipeline.lora import (  # noqa: E402
    AdapterError, read_adapter, select_target_modules, tied_module_problems)
from qwen_vl_perception.trained_prompt import PROMPT_FILE  # noqa: E402


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
