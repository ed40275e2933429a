"""Fixtures shared by the test files."""
import pytest


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Qwen3-VL checkpoint folder (weights, config, tokenizer, processor
    configs, chat template), written once per test session. Treat it as read-only."""
    pytest.importorskip('torch', reason='the tiny checkpoint needs torch')
    pytest.importorskip('transformers', reason='the tiny checkpoint needs transformers')
    from qwen_vl_perception.model.tiny import make_tiny_checkpoint
    return make_tiny_checkpoint(tmp_path_factory.mktemp('tiny-qwen3-vl') / 'checkpoint')
