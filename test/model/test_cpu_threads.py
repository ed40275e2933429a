"""torch's CPU threads for the model: one for a small model, torch's default for a large one,
the ``cpu_threads`` asked for when positive (``model/cpu_threads.py``)."""
import pytest

from qwen_vl_perception.model.cpu_threads import SMALL_MODEL_PARAMETERS, thread_count

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')


def test_auto_is_one_thread_for_a_small_model_and_torchs_default_for_a_large_one():
    assert thread_count(0, SMALL_MODEL_PARAMETERS - 1, torch_default=8) == 1
    assert thread_count(0, SMALL_MODEL_PARAMETERS, torch_default=8) == 8
    assert thread_count(3, 10, torch_default=8) == 3
    with pytest.raises(ValueError, match='cpu_threads'):
        thread_count(-1, 10, torch_default=8)


@pytest.fixture
def restored_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_an_engine_on_the_cpu_sets_torchs_threads(tiny_checkpoint, restored_threads):
    from qwen_vl_perception.model.engine import VisionLanguageEngine
    torch.set_num_threads(2)
    engine = VisionLanguageEngine(tiny_checkpoint, device='cpu')
    assert engine.cpu_threads == 1 == torch.get_num_threads()  # the tiny model is small
    engine.close()
    engine = VisionLanguageEngine(tiny_checkpoint, device='cpu', cpu_threads=2)
    assert engine.cpu_threads == 2 == torch.get_num_threads()
    engine.close()
