"""tools/quantize.py: an NF4 checkpoint that reloads as 4-bit and generates."""
import json

import pytest

from tool_runs import BASE_BUDGET, linear4bit_count

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('peft')
pytest.importorskip('bitsandbytes')

from qwen_vl_perception.model.pixel_budget import read_pixel_budget  # noqa: E402
from qwen_vl_perception.trained_prompt import PROMPT_FILE  # noqa: E402


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
