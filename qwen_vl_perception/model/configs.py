"""Qwen3-VL architecture configs: a tiny one for tests and CPU work, and the 4B's for benchmarks.

Both are returned as plain dicts (``Qwen3VLConfig(**cfg)``) so this module needs no torch.
Special token ids are those of the real Qwen3 tokenizer (151,669 tokens).
"""
import copy

IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
VISION_START_TOKEN_ID = 151652
VISION_END_TOKEN_ID = 151653
IM_START_TOKEN_ID = 151644
IM_END_TOKEN_ID = 151645
ENDOFTEXT_TOKEN_ID = 151643

_SPECIAL_IDS = {
    'image_token_id': IMAGE_TOKEN_ID,
    'video_token_id': VIDEO_TOKEN_ID,
    'vision_start_token_id': VISION_START_TOKEN_ID,
    'vision_end_token_id': VISION_END_TOKEN_ID,
}

_TINY = {
    'text_config': {
        'vocab_size': 151936,
        'hidden_size': 64,
        'intermediate_size': 128,
        'num_hidden_layers': 2,
        'num_attention_heads': 4,
        'num_key_value_heads': 2,
        'head_dim': 16,
        'max_position_embeddings': 4096,
        'rope_theta': 5000000.0,
        'rope_scaling': {'rope_type': 'default', 'mrope_section': [2, 3, 3],
                         'mrope_interleaved': True},
        'tie_word_embeddings': True,
        'bos_token_id': ENDOFTEXT_TOKEN_ID,
        'eos_token_id': IM_END_TOKEN_ID,
    },
    'vision_config': {
        'depth': 2,
        'hidden_size': 64,
        'intermediate_size': 128,
        'num_heads': 4,
        'out_hidden_size': 64,
        'patch_size': 16,
        'spatial_merge_size': 2,
        'temporal_patch_size': 2,
        'deepstack_visual_indexes': [1],
        'num_position_embeddings': 256,
        'hidden_act': 'gelu_pytorch_tanh',
        'in_channels': 3,
    },
    'tie_word_embeddings': True,
}

_QWEN3_VL_4B = {
    'text_config': {
        'vocab_size': 151936,
        'hidden_size': 2560,
        'intermediate_size': 9728,
        'num_hidden_layers': 36,
        'num_attention_heads': 32,
        'num_key_value_heads': 8,
        'head_dim': 128,
        'max_position_embeddings': 262144,
        'rope_theta': 5000000.0,
        'rope_scaling': {'rope_type': 'default', 'mrope_section': [24, 20, 20],
                         'mrope_interleaved': True},
        'rms_norm_eps': 1e-6,
        'hidden_act': 'silu',
        'tie_word_embeddings': True,
        'bos_token_id': ENDOFTEXT_TOKEN_ID,
        'eos_token_id': IM_END_TOKEN_ID,
    },
    'vision_config': {
        'depth': 24,
        'hidden_size': 1024,
        'intermediate_size': 4096,
        'num_heads': 16,
        'out_hidden_size': 2560,
        'patch_size': 16,
        'spatial_merge_size': 2,
        'temporal_patch_size': 2,
        'deepstack_visual_indexes': [5, 11, 17],
        'num_position_embeddings': 2304,
        'hidden_act': 'gelu_pytorch_tanh',
        'in_channels': 3,
    },
    'tie_word_embeddings': True,
}


def tiny_config() -> dict:
    """A Qwen3-VL small enough to train on two CPU cores (about 20 M parameters, mostly
    the 151,936-token embedding)."""
    return _with_special_ids(_TINY)


def qwen3_vl_4b_config() -> dict:
    """The Qwen3-VL-4B-Instruct architecture (4.44 B parameters), for benchmarks."""
    return _with_special_ids(_QWEN3_VL_4B)


def _with_special_ids(config: dict) -> dict:
    config = copy.deepcopy(config)
    config.update(_SPECIAL_IDS)
    return config
