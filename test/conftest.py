"""Fixtures shared by the test files; the helpers in ``support/`` import by name."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / 'support'))


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Qwen3-VL checkpoint folder (weights, config, tokenizer, processor
    configs, chat template), written once per test session. Treat it as read-only."""
    pytest.importorskip('torch', reason='the tiny checkpoint needs torch')
    pytest.importorskip('transformers', reason='the tiny checkpoint needs transformers')
    from qwen_vl_perception.pipeline.tiny import make_tiny_checkpoint
    return make_tiny_checkpoint(tmp_path_factory.mktemp('tiny-qwen3-vl') / 'checkpoint')


@pytest.fixture(scope='session')
def default_model_float32(tmp_path_factory):
    """The packed default model unpacked to float32, once per session, into a cache of its
    own (the node tests run it on the CPU with quantization 'none'). Treat it as read-only."""
    pytest.importorskip('torch', reason='the default model needs torch')
    from qwen_vl_perception.model.default_model import ensure_default_model
    return ensure_default_model('none', cache=tmp_path_factory.mktemp('default-model'),
                                log=lambda message: None)
