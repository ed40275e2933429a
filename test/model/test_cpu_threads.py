"""torch's CPU threads for the model: one for a small model, torch's default for a large one,
the ``cpu_threads`` asked for when positive (``model/cpu_threads.py``)."""
import pytest

from qwen_vl_perception.model import cpu_threads
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


def test_an_engine_on_the_cpu_sets_torchs_threads_and_its_close_puts_them_back(
        tiny_checkpoint, restored_threads):
    import threading

    import numpy as np

    from qwen_vl_perception.model.engine import VisionLanguageEngine
    engine = VisionLanguageEngine(tiny_checkpoint, device='cpu')
    assert engine.cpu_threads == 1 == torch.get_num_threads()  # the tiny model is small
    default = cpu_threads.torch_default()
    seen = []

    def elsewhere():  # another thread with its own count: generate sets it there
        torch.set_num_threads(2)
        engine.generate([np.zeros((64, 64, 3), np.uint8)], 'describe', 2,
                        on_step=lambda step: seen.append(torch.get_num_threads()) or True)
    worker = threading.Thread(target=elsewhere)
    worker.start()
    worker.join()
    assert seen and set(seen) == {1}
    other = VisionLanguageEngine(tiny_checkpoint, device='cpu', cpu_threads=2)
    assert other.cpu_threads == 2 == torch.get_num_threads()
    engine.close()  # another engine still holds a count
    assert torch.get_num_threads() == 2
    other.close()  # the last: torch's default again
    assert torch.get_num_threads() == default
