"""The prompt's prefill straight into a decode session's static KV cache, eagerly or replayed
from a CUDA graph captured per shape.

The model's own modules compute it, as its multimodal ``forward`` does: the vision tower's
``forward``, the language model's embedding, rotary embedding and decoder layers, deepstack's
additions after the first layers, the final norm and ``lm_head`` (at the last position only).
What differs is where things live, so that nothing in the computation waits for the host:

- the decoder layers' attention writes keys and values into the session's static cache
  through :class:`_CacheWriter` (a cache object with ``update`` only), not a ``DynamicCache``
  that is copied afterwards;
- the prompt is padded on the right to a multiple of a length bucket: the padded positions
  come after every real one, so causal attention keeps them out of every real position, and
  the decode step overwrites their cache entries before it attends to them (it masks keys
  after its own position);
- M-RoPE positions (the model's ``get_rope_index``), the image tokens' places and each image
  grid's vision-tower tables (interpolation taps, rotary positions, attention segments, the
  tower's ``precomputed`` inputs of ``transformers.vision_utils``) are made on the host, before
  the device work, and copied into the shape's input buffers;
- image embeddings replace the image tokens' embeddings by ``index_copy_`` at those places (the
  model's ``masked_scatter`` puts them in the same order), deepstack adds by index too.

With ``kernels`` (the session's :class:`~qwen_vl_perception.model.decode_session.StepKernels`)
the decoder layers run as the model's do, but with their RMSNorms, residual adds and SiLU x up
through those functions (compiled where they are: one kernel per norm and add instead of
about eight); each layer's attention module is the model's own.

One :class:`StaticPrefill` is one (session, padded length, image grids, left padding or not)
shape: its input buffers, the computation, and optionally its CUDA graph (captured into the
session's memory pool). :func:`frame_inputs` says whether a call's inputs can take this path
(an image or text prompt of a Qwen3-VL with sdpa or eager attention; not videos).
"""
import dataclasses
from typing import Optional, Tuple

from . import cuda_graphs
from .configs import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
from .qwen3_vl_prefill import positions_of_text, token_types
from .torch_support import require_torch

_ATTENTIONS = ('sdpa', 'eager')


@dataclasses.dataclass
class PrefillFrame:
    """One call's inputs, prepared on the host for a :class:`StaticPrefill`."""

    length: int  # prompt tokens (left padded batch)
    padded_length: int  # the length bucket the prefill runs at
    grids: Tuple[Tuple[int, int, int], ...]  # (t, h, w) per image, () for text
    left_padded: bool  # some row has padding (the explicit mask is needed)
    input_ids: object  # (batch, padded_length), CPU
    positions: object  # (3, batch, padded_length) M-RoPE positions, CPU
    key_valid: object  # (batch, padded_length) bool, CPU: real tokens
    visual_index: object  # (image tokens,) flat indices into (batch * padded_length), CPU
    pixel_values: object  # the processor's pixel values (any device), or None
    attention_mask: object  # (batch, length), as given

    @property
    def key(self) -> tuple:
        return self.padded_length, self.grids, self.left_padded

    @property
    def last_positions(self):
        """(3, batch) positions of the last prompt token."""
        return self.positions[:, :, self.length - 1]


def frame_inputs(model, parts, tensors: dict, bucket: int, limit: int) -> Optional[PrefillFrame]:
    """The host-side inputs of a static prefill, or None where it does not apply (videos,
    precomputed embeddings, a model other than Qwen3-VL with sdpa or eager attention).
    ``bucket``: the padded length is the prompt length rounded up to it, at most ``limit``
    (the session's cache length)."""
    torch = require_torch()
    if any(name in tensors for name in ('pixel_values_videos', 'inputs_embeds')):
        return None
    if not _supported(parts):
        return None
    input_ids = tensors['input_ids'].cpu()
    batch, length = input_ids.shape
    attention_mask = tensors.get('attention_mask')
    mask = (torch.ones_like(input_ids) if attention_mask is None
            else attention_mask.cpu().to(torch.long))
    if bool((input_ids == VIDEO_TOKEN_ID).any()):
        return None
    grids = ()
    pixel_values = tensors.get('pixel_values')
    if pixel_values is not None:
        grid = tensors.get('image_grid_thw')
        if grid is None or parts.rope_index is None or _visual(model) is None:
            return None
        grid = grid.cpu().to(torch.long)
        grids = tuple(tuple(int(value) for value in row) for row in grid.tolist())
        types = tensors.get('mm_token_type_ids')
        types = token_types(input_ids) if types is None else types.cpu()
        vision_positions, _ = parts.rope_index(input_ids, attention_mask=mask,
                                               mm_token_type_ids=types, image_grid_thw=grid)
    else:
        if bool((input_ids == IMAGE_TOKEN_ID).any()):
            return None
        vision_positions = positions_of_text(mask).unsqueeze(0).expand(3, -1, -1)
    padded = min(-(-length // bucket) * bucket, limit)
    extra = padded - length
    ids = torch.nn.functional.pad(input_ids, (0, extra))
    positions = torch.nn.functional.pad(vision_positions.to(torch.long), (0, extra))
    key_valid = torch.nn.functional.pad(mask.bool(), (0, extra), value=False)
    image_places = (ids == IMAGE_TOKEN_ID) & key_valid
    visual_index = image_places.reshape(-1).nonzero().reshape(-1)
    if pixel_values is not None:
        merge = _visual(model).spatial_merge_size ** 2
        expected = sum(t * h * w for t, h, w in grids) // merge
        if visual_index.numel() != expected:
            raise ValueError(f'{visual_index.numel()} image tokens for {expected} image '
                             'features')
    return PrefillFrame(length=length, padded_length=padded, grids=grids,
                        left_padded=not bool(mask.all()), input_ids=ids, positions=positions,
                        key_valid=key_valid, visual_index=visual_index,
                        pixel_values=pixel_values, attention_mask=attention_mask
                        if attention_mask is not None else mask)


def _supported(parts) -> bool:
    attention = getattr(parts.layers[0].self_attn, 'config', None)
    return getattr(attention, '_attn_implementation', None) in _ATTENTIONS


def _base(model):
    return model.get_base_model() if hasattr(model, 'get_base_model') else model


def _visual(model):
    return getattr(getattr(_base(model), 'model', None), 'visual', None)


class _CacheWriter:
    """What the decoder layers' attention sees as its cache: ``update`` writes a layer's keys
    and values into the session's static cache (its first ``length`` positions) and returns
    them there."""

    def __init__(self, keys, values, length: int):
        self.keys = [buffer[:, :, :length] for buffer in keys]
        self.values = [buffer[:, :, :length] for buffer in values]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.copy_(key_states)
        values.copy_(value_states)
        return keys, values


class StaticPrefill:
    """One prefill shape of one decode session: input buffers, the computation (writing the
    session's cache and :attr:`logits`) and, once :meth:`capture` ran, its CUDA graph."""

    def __init__(self, torch, model, parts, session, frame: PrefillFrame, kernels=None):
        self.torch = torch
        self.kernels = kernels  # StepKernels for the layers' elementwise work, or None
        self.model = _base(model)
        self.parts = parts
        # The session's static cache, not the session: it owns this shape (no cycle).
        self.cache = (session.keys, session.values)
        self.device = session.device
        self.key = frame.key
        batch, device = session.batch, session.device
        length = frame.padded_length
        if frame.input_ids.shape != (batch, length):
            raise ValueError(f'a frame of {tuple(frame.input_ids.shape)} tokens for a session '
                             f'of batch {batch}')
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(batch, length, **long)
        self.positions = torch.zeros(3, batch, length, **long)
        self.key_valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.last = torch.zeros(1, **long)
        self.visual_index = torch.zeros(frame.visual_index.numel(), **long)
        self.logits = None  # (batch, vocab), made by the first forward
        self.visual = _visual(model) if frame.grids else None
        self.pixel_values = self.vision_kwargs = None
        self.image_embeds = self.deepstack = None  # made by the first forward
        if self.visual is not None:
            pixels = frame.pixel_values
            self.pixel_values = torch.zeros(tuple(pixels.shape), dtype=self.visual.dtype,
                                            device=device)
            self.grid = torch.tensor(frame.grids, **long)
            self.vision_kwargs = _vision_tables(torch, self.visual, frame.grids, device)
        attention = parts.layers[0].self_attn.config._attn_implementation
        self.causal_only = attention == 'sdpa' and not frame.left_padded
        self.index = torch.arange(length, **long)
        self.graph = None

    @property
    def vision_in_graph(self) -> bool:
        """Whether the vision tower runs inside the graph (its tables could be made ahead)."""
        return self.visual is None or self.vision_kwargs is not None

    def load(self, frame: PrefillFrame) -> None:
        """Copy a frame's inputs into the buffers."""
        self.input_ids.copy_(frame.input_ids)
        self.positions.copy_(frame.positions)
        self.key_valid.copy_(frame.key_valid)
        self.last.fill_(frame.length - 1)
        self.visual_index.copy_(frame.visual_index)
        if self.pixel_values is not None:
            self.pixel_values.copy_(frame.pixel_values)

    def run(self) -> None:
        """Prefill the loaded frame: the graph's replay, or the computation itself."""
        if self.graph is None:
            self.forward()
            return
        if not self.vision_in_graph:
            self.vision()
        self.graph.replay()

    def forward(self) -> None:
        self.vision()
        self.language()

    def vision(self) -> None:
        """The vision tower's image embeddings and deepstack features, into their buffers."""
        if self.visual is None:
            return
        torch = self.torch
        if self.vision_kwargs is not None:
            output = self.visual(self.pixel_values, grid_thw=self.grid, return_dict=True,
                                 **dict(self.vision_kwargs))
            embeds, deepstack = output.pooler_output, list(output.deepstack_features)
        else:  # the model's own way, which waits for the device (not capturable)
            output = self.model.model.get_image_features(self.pixel_values, self.grid,
                                                         return_dict=True)
            embeds = torch.cat(list(output.pooler_output), dim=0)
            deepstack = [torch.cat(list(feature), dim=0)
                         for feature in output.deepstack_features]
        dtype = self.parts.embed_tokens.weight.dtype
        if self.image_embeds is None:
            self.image_embeds = torch.empty(tuple(embeds.shape), dtype=dtype,
                                            device=embeds.device)
            self.deepstack = torch.empty((len(deepstack),) + tuple(embeds.shape), dtype=dtype,
                                         device=embeds.device)
        self.image_embeds.copy_(embeds)
        for index, feature in enumerate(deepstack):
            self.deepstack[index].copy_(feature)

    def language(self) -> None:
        """The language model over the padded prompt, into the session's cache; the last
        prompt position's logits into :attr:`logits`."""
        torch, parts = self.torch, self.parts
        batch, length = self.input_ids.shape
        hidden = parts.embed_tokens(self.input_ids)
        width = hidden.shape[-1]
        if self.visual is not None:
            hidden.view(batch * length, width).index_copy_(
                0, self.visual_index, self.image_embeds.to(hidden.dtype))
        cos, sin = parts.rotary_emb(hidden, self.positions)
        mask = None if self.causal_only else self._mask(hidden.dtype)
        writer = _CacheWriter(*self.cache, length)
        deepstack = 0 if self.deepstack is None else self.deepstack.shape[0]

        def add_deepstack(index, hidden):
            if index < deepstack:
                flat = hidden.view(batch * length, width)
                added = flat.index_select(0, self.visual_index) + self.deepstack[index]
                flat.index_copy_(0, self.visual_index, added)

        if self.kernels is None:
            for index, layer in enumerate(parts.layers):
                hidden = layer(hidden, (cos, sin), mask, None, writer)
                add_deepstack(index, hidden)
        else:
            hidden = self._layers_through_kernels(hidden, (cos, sin), mask, writer, deepstack,
                                                  add_deepstack)
        last = parts.norm(hidden.index_select(1, self.last))
        logits = parts.lm_head(last)[:, 0]
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)

    def _layers_through_kernels(self, hidden, rotary, mask, writer, deepstack, add_deepstack):
        """The decoder layers as the model's forward runs them (same operations, same order),
        their norms, residual adds and activation through :attr:`kernels`: a layer's residual
        add goes with the next norm (``add_rms_norm``) except where deepstack adds to the
        stream in between."""
        kernels, layers = self.kernels, self.parts.layers
        normed = None
        for index, layer in enumerate(layers):
            if normed is None:
                norm = layer.input_layernorm
                normed = kernels.rms_norm(hidden, norm.weight, norm.variance_epsilon)
            delta, _ = layer.self_attn(normed, rotary, mask, writer)
            norm = layer.post_attention_layernorm
            hidden, normed = kernels.add_rms_norm(hidden, delta, norm.weight,
                                                  norm.variance_epsilon)
            mlp = layer.mlp
            delta = mlp.down_proj(kernels.act_mul(mlp, mlp.gate_proj(normed),
                                                  mlp.up_proj(normed)))
            if index < deepstack or index + 1 == len(layers):
                hidden, normed = hidden + delta, None
                add_deepstack(index, hidden)
            else:
                norm = layers[index + 1].input_layernorm
                hidden, normed = kernels.add_rms_norm(hidden, delta, norm.weight,
                                                      norm.variance_epsilon)
        return hidden

    def _mask(self, dtype):
        """Additive (batch, 1, length, length) mask: causal, padding keys out; every position
        sees itself, so that no padded row is empty (finite values everywhere)."""
        torch = self.torch
        index = self.index
        causal = index[None, :] <= index[:, None]
        valid = (causal[None] & self.key_valid[:, None, :]) | torch.eye(
            index.numel(), dtype=torch.bool, device=index.device)[None]
        zero = torch.zeros((), dtype=dtype, device=index.device)
        low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=index.device)
        return torch.where(valid, zero, low)[:, None]

    def capture(self, stream, pool) -> None:
        """Warm up once on ``stream`` (compiles kernels, makes the output buffers) and capture
        the computation in a CUDA graph in ``pool``. A failure is raised as is."""
        torch = self.torch
        device = self.device
        with cuda_graphs.capturing(self):
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                self.forward()
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                if self.vision_in_graph:
                    self.vision()
                self.language()
            self.graph = graph

    def release(self) -> None:
        if self.graph is not None:
            self.graph.reset()
            self.graph = None
        self.pixel_values = self.image_embeds = self.deepstack = self.logits = None
        self.model = self.visual = self.cache = None


def _vision_tables(torch, visual, grids, device) -> Optional[dict]:
    """The vision tower's per-grid inputs that its ``forward`` would make from ``grid_thw``
    with device waits (``.tolist()``, ``repeat_interleave``): made once on the host, as the
    tower's precomputed keyword arguments (``transformers.vision_utils``); the attention
    segments stay on the host (the tower splits by them). None when this transformers or
    tower has no such inputs, or its attention wants the segments on the device (flash
    attention): the tower then runs its own way, outside the graph."""
    if getattr(visual.config, '_attn_implementation', None) not in _ATTENTIONS:
        return None
    try:
        from transformers import vision_utils
        grid = torch.tensor(grids, dtype=torch.long)
        indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners,
            spatial_merge_size=visual.config.spatial_merge_size)
        positions = vision_utils.get_vision_position_ids(grid, visual.spatial_merge_size)
        segments = vision_utils.get_vision_cu_seqlens(grid)
    except (ImportError, AttributeError, TypeError):
        return None
    return {'interp_indices': indices.to(device), 'interp_weights': weights.to(device),
            'position_ids': positions.to(device), 'cu_seqlens': segments}
