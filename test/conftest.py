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
