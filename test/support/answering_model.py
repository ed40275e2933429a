"""The node tests' model: the tiny Qwen3-VL trained (``trained_models.memorize_answer``) to
give one known answer, so that the expected pixel boxes, attributes and ids are known exactly;
and the node's parameters for it."""
CATEGORIES = ['cup', 'bottle']
ATTRIBUTES = ['color']
ANSWER = ('```json\n[\n  {"bbox_2d": [100, 200, 300, 400], "label": "cup", "color": "red"},\n'
          '  {"bbox_2d": [500, 500, 900, 800], "label": "bottles", "color": "green"}\n]\n```')
# On a 640x480 image: x * 640 / 1000, y * 480 / 1000.
EXPECTED = [('cup', (128.0, 144.0), (128.0, 96.0), 'red'),
            ('bottle', (448.0, 312.0), (256.0, 144.0), 'green')]


def make_answering_checkpoint(tiny_checkpoint, out_dir):
    """The tiny checkpoint trained to answer ANSWER to the instruction of CATEGORIES and
    ATTRIBUTES, with the detection_prompt.json that prepare_data/finetune leave beside a
    model; returns its folder."""
    from qwen_vl_perception.prompt import PromptBuilder
    from qwen_vl_perception.trained_prompt import write_prompt_file
    from trained_models import memorize_answer
    prompt = PromptBuilder(CATEGORIES, describe=True, attributes=ATTRIBUTES)
    model = memorize_answer(tiny_checkpoint, out_dir, prompt.instruction, ANSWER)
    write_prompt_file(model, prompt)
    return model


def node_parameters(checkpoint, **overrides):
    values = {
        'model_path': str(checkpoint), 'device': 'cpu', 'quantization': 'none',
        'min_pixels': 1024, 'max_pixels': 16384, 'categories': CATEGORIES,
        'describe': True, 'attributes': ATTRIBUTES, 'score_threshold': 0.0,
        'max_new_tokens': 96,
    }
    values.update(overrides)
    return values
