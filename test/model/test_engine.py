"""Loading, generation and the engine, on the tiny random Qwen3-VL (CPU, a few seconds)."""
import json
import shutil
import threading

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from qwen_vl_perception.model.configs import IM_END_TOKEN_ID, tiny_config  # noqa: E402
from qwen_vl_perception.model.engine import VisionLanguageEngine  # noqa: E402
from qwen_vl_perception.model.generation import (  # noqa: E402
    decode_with_offsets, generate_hf, make_generations)
from qwen_vl_perception.model.loading import (  # noqa: E402
    ModelLoadError, describe_checkpoint, load_model, model_quantization)
from qwen_vl_perception.model.checkpoint_files import copy_processor_files  # noqa: E402

INSTRUCTION = 'locate every instance that belongs to the following categories: "cup, bottle".'
PIXELS = {'min_pixels': 64 * 64, 'max_pixels': 128 * 128}  # few visual tokens: fast on a CPU


def _image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _linear4bit_names(model):
    bnb = pytest.importorskip('bitsandbytes')
    return [name for name, module in model.named_modules()
            if isinstance(module, bnb.nn.Linear4bit)]


def _assert_consistent(generation, tokenizer):
    ids, probs, offsets = generation.token_ids, generation.token_probs, generation.token_offsets
    assert len(ids) == len(probs) == len(offsets)
    assert all(0.0 < prob <= 1.0 for prob in probs)
    assert generation.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert ''.join(generation.text[start:end] for start, end in offsets) == generation.text
    assert all(end >= start for start, end in offsets)
    assert all(offsets[i][1] == offsets[i + 1][0] for i in range(len(offsets) - 1))


@pytest.fixture(scope='module')
def engine(tiny_checkpoint):
    return VisionLanguageEngine(tiny_checkpoint, device='cpu', **PIXELS)  # quantization 'auto'


def test_checkpoint_reloads_with_the_seeded_weights(tiny_checkpoint):
    loaded = transformers.AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    assert type(loaded) is transformers.Qwen3VLForConditionalGeneration
    torch.manual_seed(0)
    fresh = transformers.Qwen3VLForConditionalGeneration(
        transformers.Qwen3VLConfig(**tiny_config()))
    expected = fresh.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    info = describe_checkpoint(tiny_checkpoint)
    assert info['quantized'] is False and info['quantization'] == 'none'
    assert info['text']['hidden_size'] == 64 and info['vision']['patch_size'] == 16
    assert info['weight_files'] == ['model.safetensors'] and info['has_processor_files']


def test_engine_defaults_on_cpu(engine):
    assert engine.device == torch.device('cpu')
    assert engine.quantization == 'none' and engine.quantized is False
    assert not engine.model.training
    assert engine.stop_token_ids[0] == IM_END_TOKEN_ID


def test_generate_gives_consistent_text_offsets_and_probabilities(engine):
    image = _image(96, 128)
    generation, = engine.generate([image], INSTRUCTION, max_new_tokens=6)
    _assert_consistent(generation, engine.tokenizer)
    assert generation.finished or len(generation.token_ids) == 6
    assert generation.model_input_size == (128, 96)
    assert engine.last_timing.new_tokens >= len(generation.token_ids)
    # The first token is the argmax of a plain forward pass, with its softmax probability.
    inputs = engine.inputs.build([image], INSTRUCTION)
    with torch.inference_mode():
        logits = engine.model(**inputs.tensors).logits[0, -1]
    probs = torch.softmax(logits.float(), dim=-1)
    assert generation.token_ids[0] == int(probs.argmax())
    assert generation.token_probs[0] == pytest.approx(float(probs.max()), rel=1e-4)


def test_batch_of_two_equals_two_singles(engine):
    images = [_image(96, 128, seed=1), _image(64, 64, seed=2)]  # different prompt lengths
    batch = engine.generate(images, INSTRUCTION, max_new_tokens=5)
    singles = [engine.generate([image], INSTRUCTION, max_new_tokens=5)[0] for image in images]
    for together, alone in zip(batch, singles):
        assert together.token_ids == alone.token_ids
        assert together.token_probs == pytest.approx(alone.token_probs, rel=1e-4)
        assert together.model_input_size == alone.model_input_size
    # The images change the probabilities, so the comparison above is not vacuous.
    assert singles[0].token_probs[0] != pytest.approx(singles[1].token_probs[0], rel=1e-4)


def test_stop_tokens_end_decoding(engine):
    inputs = engine.inputs.build([_image(64, 96)], INSTRUCTION)
    first, = generate_hf(engine.model, engine.tokenizer, inputs, 4, engine.stop_token_ids)
    assert first.finished or len(first.token_ids) == 4
    stopped, = generate_hf(engine.model, engine.tokenizer, inputs, 4, [first.token_ids[0]])
    assert stopped.finished and stopped.token_ids == [] and stopped.text == ''
    assert stopped.stop_token_id == first.token_ids[0]


def test_decoder_seam_is_used(engine, monkeypatch):
    answer = '```json\n[{"bbox_2d": [10, 20, 300, 400], "label": "cup"}]\n```'
    answer_ids = engine.tokenizer.encode(answer, add_special_tokens=False)
    calls = []

    def fixed_decoder(model, inputs, max_new_tokens, stop_token_ids):
        calls.append((inputs.batch_size, max_new_tokens, list(stop_token_ids)))
        ids = answer_ids + [IM_END_TOKEN_ID]
        return [ids] * inputs.batch_size, [[0.5] * len(ids)] * inputs.batch_size

    monkeypatch.setattr(engine, 'decoder', fixed_decoder)
    generations = engine.generate([_image(64, 64), _image(70, 90)], INSTRUCTION, 50)
    assert calls == [(2, 50, engine.stop_token_ids)]
    for generation in generations:
        assert generation.text == answer and generation.finished
        assert generation.token_probs == [0.5] * len(answer_ids)
        _assert_consistent(generation, engine.tokenizer)


def test_generate_from_two_threads(engine):
    image = _image(64, 64, seed=5)
    expected = engine.generate([image], INSTRUCTION, 3)[0].token_ids
    results, errors = [], []

    def work():
        try:
            results.append(engine.generate([image], INSTRUCTION, 3)[0].token_ids)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and results == [expected, expected]


def test_decode_with_offsets_handles_multibyte_and_special_tokens(engine):
    tokenizer = engine.tokenizer
    text = 'Größe: 日本の🦜 {"bbox_2d": [12, 345, 678, 900], "label": "tasse"}'
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoded, offsets = decode_with_offsets(tokenizer, ids)
    assert decoded == text and len(offsets) == len(ids)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(offsets[i][1] == offsets[i + 1][0] for i in range(len(offsets) - 1))
    for token, (start, end) in zip(ids, offsets):
        piece = tokenizer.decode([token])
        if '\ufffd' not in piece:  # a whole character or more: its own text
            assert text[start:end] == piece
    assert any(start == end for start, end in offsets)  # the parrot spans several tokens
    special = tokenizer.convert_tokens_to_ids('<|box_start|>')
    decoded, offsets = decode_with_offsets(tokenizer, [special] + ids[:3])
    assert decoded == tokenizer.decode(ids[:3]) and offsets[0] == (0, 0)
    assert decode_with_offsets(tokenizer, []) == ('', [])


def test_make_generations_strips_the_stop_token(engine):
    ids = engine.tokenizer.encode('[]', add_special_tokens=False)
    done, cut = make_generations(engine.tokenizer, [ids + [IM_END_TOKEN_ID], ids],
                                 [[0.9] * (len(ids) + 1), [0.8] * len(ids)],
                                 engine.stop_token_ids, [(64, 32), (32, 64)])
    assert (done.text, done.finished, done.token_ids, done.model_input_size) == (
        '[]', True, ids, (64, 32))
    assert (cut.text, cut.finished, len(cut.token_probs)) == ('[]', False, len(ids))
    with pytest.raises(ValueError, match='probabilities'):
        make_generations(engine.tokenizer, [ids * 2], [[0.5]], engine.stop_token_ids)


def test_bad_generate_arguments(engine):
    with pytest.raises(ValueError, match='max_new_tokens'):
        engine.generate([_image(64, 64)], INSTRUCTION, 0)
    with pytest.raises(ValueError):
        engine.generate([], INSTRUCTION, 3)


@pytest.fixture
def broken_dirs(tmp_path, tiny_checkpoint):
    no_weights = tmp_path / 'no_weights'
    no_weights.mkdir()
    shutil.copyfile(tiny_checkpoint / 'config.json', no_weights / 'config.json')
    llama = tmp_path / 'llama'
    llama.mkdir()
    (llama / 'config.json').write_text(json.dumps({'model_type': 'llama'}))
    (llama / 'model.safetensors').write_bytes(b'')
    not_json = tmp_path / 'not_json'
    not_json.mkdir()
    (not_json / 'config.json').write_text('{"model_type": ')
    a_file = tmp_path / 'model.safetensors'
    a_file.write_bytes(b'')
    return {'missing': tmp_path / 'nowhere', 'file': a_file, 'empty': _mkdir(tmp_path / 'empty'),
            'no_weights': no_weights, 'llama': llama, 'not_json': not_json}


def _mkdir(path):
    path.mkdir()
    return path


@pytest.mark.parametrize('case, message', [
    ('missing', 'does not exist'),
    ('file', 'is not a directory'),
    ('empty', 'has no config.json'),
    ('no_weights', 'has no weights'),
    ('llama', "'llama' model, not Qwen3-VL"),
    ('not_json', 'cannot be read as JSON'),
])
def test_load_errors_say_what_is_wrong(broken_dirs, case, message):
    with pytest.raises(ModelLoadError, match=message) as raised:
        load_model(broken_dirs[case])
    assert str(broken_dirs[case]) in str(raised.value)
    with pytest.raises(ModelLoadError, match=message):
        describe_checkpoint(broken_dirs[case])


def test_bad_load_options(tiny_checkpoint):
    with pytest.raises(ModelLoadError, match='quantization must be one of'):
        load_model(tiny_checkpoint, quantization='int3')
    with pytest.raises(ModelLoadError, match="device must be"):
        load_model(tiny_checkpoint, device='tpu')
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match='CUDA is not available'):
            load_model(tiny_checkpoint, device='cuda')


@pytest.fixture(scope='module')
def nf4_engine(tiny_checkpoint):
    pytest.importorskip('bitsandbytes')
    return VisionLanguageEngine(tiny_checkpoint, device='cpu', quantization='nf4', **PIXELS)


def test_nf4_on_cpu_quantizes_the_language_model_only(nf4_engine):
    assert nf4_engine.quantization == 'nf4' and nf4_engine.quantized
    names = _linear4bit_names(nf4_engine.model)
    layers = tiny_config()['text_config']['num_hidden_layers']
    assert len(names) == 7 * layers  # q, k, v, o, gate, up, down of each decoder layer
    assert all(name.startswith('model.language_model.layers.') for name in names)
    generation, = nf4_engine.generate([_image(96, 128)], INSTRUCTION, 4)
    _assert_consistent(generation, nf4_engine.tokenizer)


def test_prequantized_checkpoint_reloads_as_4bit(nf4_engine, tiny_checkpoint, tmp_path):
    saved = tmp_path / 'nf4'
    nf4_engine.model.save_pretrained(saved)
    copy_processor_files(tiny_checkpoint, saved)
    info = describe_checkpoint(saved)
    assert info['quantized'] and info['quantization'] == 'nf4'
    assert info['weight_bytes'] < describe_checkpoint(tiny_checkpoint)['weight_bytes']
    reloaded = load_model(saved, device='cpu')  # 'auto': loaded as it is
    assert model_quantization(reloaded) == 'nf4'
    assert _linear4bit_names(reloaded) == _linear4bit_names(nf4_engine.model)
    assert reloaded.model.visual.blocks[0].attn.qkv.weight.dtype == torch.float32
    inputs = nf4_engine.inputs.build([_image(64, 96)], INSTRUCTION)
    with torch.inference_mode():
        before = nf4_engine.model(**inputs.tensors).logits[0, -1]
        after = reloaded(**inputs.tensors).logits[0, -1]
    assert torch.allclose(before, after, atol=1e-5)
    with pytest.raises(ModelLoadError, match='already quantized'):
        load_model(saved, device='cpu', quantization='none')
    engine = VisionLanguageEngine(saved, device='cpu', **PIXELS)
    assert engine.quantization == 'nf4'
    assert len(engine.generate([_image(64, 64)], INSTRUCTION, 2)[0].token_probs) >= 1
    engine.close()
    with pytest.raises(RuntimeError, match='closed'):
        engine.generate([_image(64, 64)], INSTRUCTION, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_auto_on_cuda_is_nf4_and_generates(tiny_checkpoint):
    pytest.importorskip('bitsandbytes')
    engine = VisionLanguageEngine(tiny_checkpoint, **PIXELS)  # device and quantization 'auto'
    assert engine.device.type == 'cuda' and engine.quantization == 'nf4'
    assert len(_linear4bit_names(engine.model)) == 7 * tiny_config()['text_config'][
        'num_hidden_layers']
    images = [_image(96, 128, seed=1), _image(64, 64, seed=2)]
    for generation in engine.generate(images, INSTRUCTION, max_new_tokens=5):
        _assert_consistent(generation, engine.tokenizer)
    engine.close()
    plain = VisionLanguageEngine(tiny_checkpoint, quantization='none', **PIXELS)
    assert plain.device.type == 'cuda' and plain.model.dtype == torch.bfloat16
    generation, = plain.generate(images[:1], INSTRUCTION, max_new_tokens=5)
    _assert_consistent(generation, plain.tokenizer)
    plain.close()


def test_on_step_hook_gets_the_text_so_far_and_can_stop(engine):
    image = _image(64, 64, seed=5)
    full, = engine.generate([image], INSTRUCTION, 6)
    texts = []

    def hook(step):
        texts.append(step.texts())
        return step.count < 3

    stopped, = engine.generate([image], INSTRUCTION, 6, on_step=hook)
    assert len(texts) == min(3, len(full.token_ids) + int(full.finished))
    assert stopped.token_ids == full.token_ids[:3] and not stopped.finished
    assert full.text.startswith(texts[-1][0]) and texts[-1] == [stopped.text]
