"""Qwen3-VL's language model as the fast decoder sees it: its modules, and the prompt's prefill
through the model's own multimodal ``forward`` (vision tower, deepstack, M-RoPE positions
exactly as ``generate`` builds them) into a ``DynamicCache``."""
import inspect
from dataclasses import dataclass, field

from .configs import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
from .torch_support import require, require_torch


@dataclass
class TextModelParts:
    """The modules of Qwen3-VL's language model that one decode step uses."""

    embed_tokens: object
    layers: list
    norm: object
    rotary_emb: object
    lm_head: object
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_index: object = field(default=None)


def text_model_parts(model) -> TextModelParts:
    """Find the language model's modules in a Qwen3-VL ``...ForConditionalGeneration``."""
    base = model.get_base_model() if hasattr(model, 'get_base_model') else model
    inner = getattr(base, 'model', None)
    text = getattr(inner, 'language_model', None) or getattr(base, 'language_model', None)
    if text is None or not hasattr(text, 'layers'):
        raise TypeError(f'{type(model).__name__} is not a Qwen3-VL model with a language_model')
    lm_head = base.get_output_embeddings()
    config = text.config
    head_dim = (getattr(config, 'head_dim', None)
                or config.hidden_size // config.num_attention_heads)
    return TextModelParts(
        embed_tokens=text.embed_tokens, layers=list(text.layers), norm=text.norm,
        rotary_emb=text.rotary_emb, lm_head=lm_head, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads, head_dim=head_dim,
        rope_index=getattr(inner, 'get_rope_index', None))


def prefill(model, tensors: dict):
    """Run the prompt through the model as ``generate``'s first step does.

    Returns the last position's logits (batch, vocab), the filled ``DynamicCache`` and the
    prompt's (3, batch, length) M-RoPE positions.
    """
    torch = require_torch()
    transformers = require('transformers', 'to prefill Qwen3-VL')
    parts = text_model_parts(model)
    input_ids = tensors['input_ids']
    attention_mask = tensors.get('attention_mask')
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
        tensors['attention_mask'] = attention_mask
    if 'mm_token_type_ids' not in tensors:
        tensors['mm_token_type_ids'] = token_types(input_ids)
    # Text positions as generate makes them (left padding aware), then M-RoPE positions.
    text_positions = positions_of_text(attention_mask)
    rope_kwargs = {name: tensors[name] for name in (
        'image_grid_thw', 'video_grid_thw', 'mm_token_type_ids') if name in tensors}
    if parts.rope_index is not None and (
            'image_grid_thw' in tensors or 'video_grid_thw' in tensors):
        vision_positions, _ = parts.rope_index(input_ids, attention_mask=attention_mask,
                                               **rope_kwargs)
    else:
        vision_positions = text_positions.unsqueeze(0).expand(3, -1, -1)
    position_ids = torch.cat([text_positions.unsqueeze(0), vision_positions], dim=0)

    cache = transformers.DynamicCache(config=model.config)
    kwargs = dict(tensors)
    kwargs.update(position_ids=position_ids, use_cache=True, logits_to_keep=1)
    kwargs[_cache_argument(model)] = cache
    output = model(**kwargs)
    logits = output.logits[:, -1, :]
    return logits, cache, vision_positions


def token_types(input_ids):
    """Qwen3-VL's ``mm_token_type_ids``: 1 at image tokens, 2 at video tokens, else 0."""
    return (input_ids == IMAGE_TOKEN_ID).long() + 2 * (input_ids == VIDEO_TOKEN_ID).long()


def positions_of_text(attention_mask):
    """Text positions as ``generate`` makes them: counted over the unmasked tokens (left
    padding aware), 0 at padding."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def _cache_argument(model) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return 'past_key_values'
    return 'cache' if 'cache' in parameters else 'past_key_values'
