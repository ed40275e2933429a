"""Fast greedy decoding for Qwen3-VL: the model's own prefill, then a lean decode loop.

:class:`FastGreedyDecoder` has the :class:`~qwen_vl_perception.model.generation.Decoder`
signature and computes what ``model.generate`` greedy (``hf_decode``) computes: in float32 the
same tokens; in bf16/fp16 its kernels round differently, so near-tied logits can flip:

1. Prefill runs the model's normal multimodal ``forward`` (vision tower, deepstack, M-RoPE
   positions exactly as ``generate`` builds them) into a ``DynamicCache``; its keys and values
   are then copied into a static cache of ``(batch, kv_heads, cache_len, head_dim)`` buffers.
2. Each new token goes through a hand-written step over the language model's own modules
   (norms, projections, MLP, rotary embedding, ``lm_head``), so plain, bitsandbytes 4-bit and
   other ``nn.Module`` linears all work. All three M-RoPE components of a text token after the
   prompt are ``last prompt position + 1 + step`` (``cache_position + rope_delta`` without
   padding). Greedy argmax; each chosen token's softmax probability is kept.
3. On CUDA the step is captured once in a CUDA graph per (batch size, cache length bucket,
   model) and replayed for every token of every later frame: launching ~1000 small kernels
   one by one is what makes eager decoding slow. Elementwise work (RMSNorm, rotary, SiLU,
   sampling bookkeeping) is fused with ``torch.compile`` first when ``fuse_elementwise``
   (by default where Triton is there: torch.compile's CUDA code is Triton). On CPU the same
   step runs eagerly.
4. On CUDA, for batches of three or more, bitsandbytes NF4 linears of the step run through
   one fused Triton kernel (:mod:`~qwen_vl_perception.model.nf4_matmul`) that reads the 4-bit
   weight once for every sequence of the batch, where bitsandbytes dequantizes whole weights
   to bf16 first. During prefill the NF4 linears of the whole model dequantize with one
   kernel each and multiply with ``linear``, skipping bitsandbytes' Python layers (prefill is
   bound by host time). ``nf4_kernel=False`` keeps bitsandbytes' own path everywhere.

Sequences that produce a stop token keep decoding (their outputs are masked and dropped) until
all are done or ``max_new_tokens`` is reached; batches are left padded, as ``InputBuilder``
makes them.
"""
import contextlib
import inspect
import time
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .configs import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
from .generation import trim_at_stop
from .torch_support import require, require_torch, triton_missing_reason

MAX_STOP_IDS = 8
"""Stop ids live in a fixed-size device buffer so that one captured graph serves any set."""
_NO_TOKEN = -1


@dataclass
class DecodeTiming:
    """Seconds spent in the last call (host clock, device synchronised at each boundary)."""

    prefill_s: float = 0.0
    setup_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    graph_captured: bool = False

    @property
    def decode_ms_per_token(self) -> float:
        return 1000.0 * self.decode_s / self.decode_steps if self.decode_steps else 0.0


@dataclass
class _TextModelParts:
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


class FastGreedyDecoder:
    """Greedy decoder with a static KV cache and, on CUDA, CUDA-graph replay.

    ``use_cuda_graphs``: ``None`` means "on CUDA, yes"; ``fuse_elementwise``: ``None``
    means "with CUDA graphs, when Triton imports" (:meth:`fuses_elementwise`). The cache
    length is the prompt plus ``max_new_tokens`` rounded up to ``cache_bucket`` tokens so that
    frames of slightly different prompt lengths share one captured graph. On CUDA the loop
    checks whether every sequence has stopped once per ``sync_interval`` tokens (each check
    is a device synchronisation). ``max_sessions`` captured graphs are kept (least recently
    used dropped). ``nf4_kernel``: ``None`` means "on CUDA when Triton is there, until it
    fails once" (then a warning, and bitsandbytes' path). Warm-up and kernel tuning before
    each capture run on one side stream per device, so that the CUDA libraries' per-stream
    workspaces are not allocated again for every capture (the capture itself uses PyTorch's
    capture stream). The instance is callable like ``hf_decode``; not thread-safe (the
    engine serialises calls).
    """

    def __init__(self, use_cuda_graphs: Optional[bool] = None,
                 fuse_elementwise: Optional[bool] = None, cache_bucket: int = 256,
                 sync_interval: int = 8, max_sessions: int = 4,
                 nf4_kernel: Optional[bool] = None):
        if cache_bucket < 1 or sync_interval < 1 or max_sessions < 1:
            raise ValueError('cache_bucket, sync_interval and max_sessions must be positive')
        self.use_cuda_graphs = use_cuda_graphs
        self.fuse_elementwise = fuse_elementwise
        self.cache_bucket = int(cache_bucket)
        self.sync_interval = int(sync_interval)
        self.max_sessions = int(max_sessions)
        self.nf4_kernel = nf4_kernel
        self.last_timing = DecodeTiming()
        self._nf4_matmul = None
        self._nf4_devices: Dict[str, object] = {}
        self._nf4_failed = False
        # model -> [(module, its NF4Matmul linear, the compute dtype it was made for)]
        self._nf4_linears = weakref.WeakKeyDictionary()
        self._capture_streams: Dict[str, object] = {}
        self._sessions: 'OrderedDict[tuple, _DecodeSession]' = OrderedDict()
        self._kernels: Dict[bool, '_Kernels'] = {}

    def __call__(self, model, inputs, max_new_tokens: int,
                 stop_token_ids: Sequence[int]) -> Tuple[List[List[int]], List[List[float]]]:
        torch = require_torch()
        if max_new_tokens < 1:
            raise ValueError('max_new_tokens must be at least 1')
        stop_token_ids = [int(token) for token in stop_token_ids]
        if len(stop_token_ids) > MAX_STOP_IDS:
            raise ValueError(f'at most {MAX_STOP_IDS} stop token ids, got {len(stop_token_ids)}')
        tensors = dict(getattr(inputs, 'tensors', inputs))
        with torch.inference_mode():
            return self._decode(torch, model, tensors, int(max_new_tokens), stop_token_ids)

    def choices_given(self, model, inputs, token_ids) -> List[List[int]]:
        """Teacher forcing: our greedy choice at each position of ``token_ids`` given the
        prompt and the tokens of ``token_ids`` before it.

        ``token_ids``: one equally long list per sequence (e.g. another decoder's output with
        no stop tokens). Where both decoders compute the same function the result equals
        ``token_ids``; unlike comparing free-running outputs, one near-tie does not make every
        later token differ, so this measures per-token agreement.
        """
        torch = require_torch()
        lengths = {len(row) for row in token_ids}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError('token_ids must be non-empty lists of equal length')
        count = lengths.pop()
        tensors = dict(getattr(inputs, 'tensors', inputs))
        with torch.inference_mode():
            session, graphs = self._prefilled_session(torch, model, tensors, count, [])
            forced = torch.tensor(token_ids, dtype=torch.long, device=session.device)
            advance = session.graph.replay if graphs else session.step
            for index in range(1, count):
                session.token.copy_(forced[:, index - 1])
                advance()
            return session.results(count)[0]

    def clear(self) -> None:
        """Drop the captured graphs and static caches (frees their GPU memory) and what was
        learnt about the model's layers: call it after changing a model in place."""
        while self._sessions:
            self._sessions.popitem()[1].release()
        self._nf4_linears = weakref.WeakKeyDictionary()

    # -- what the last call ran (for tools that report it) --------------------------------

    @property
    def last_session_fused(self) -> bool:
        """Whether the session of the last call runs its elementwise pieces fused by
        ``torch.compile`` (False before any call, after :meth:`clear`, or after a fallback)."""
        session = self._last_session()
        return bool(session is not None and session.kernels.fused)

    @property
    def last_session_nf4_layers(self) -> int:
        """How many NF4 layers the session of the last call routes through
        :class:`~qwen_vl_perception.model.nf4_matmul.NF4Matmul` (its fused kernel from 3 rows,
        bitsandbytes' GEMV below); 0 before any call or after :meth:`clear`."""
        session = self._last_session()
        if session is None:
            return 0
        return sum(linear is not module for module, linear in session.linears.items())

    def step_eagerly(self, steps: int = 1) -> None:
        """Run the last call's decode step ``steps`` times without its CUDA graph (to profile
        where a step's device time goes). It advances that session's state: the next call
        loads its frame afresh, so later results are unaffected."""
        session = self._last_session()
        if session is None:
            raise ValueError('no decode session yet: call the decoder first')
        with require_torch().inference_mode():
            for _ in range(steps):
                session.step()

    def _last_session(self) -> Optional['_DecodeSession']:
        """The session used most recently (sessions move to the end when used)."""
        return next(reversed(self._sessions.values()), None)

    # -- the call ------------------------------------------------------------------------

    def _decode(self, torch, model, tensors, max_new_tokens, stop_token_ids):
        started = time.perf_counter()
        session, graphs = self._prefilled_session(torch, model, tensors, max_new_tokens,
                                                  stop_token_ids)
        loaded = time.perf_counter()
        timing = self.last_timing
        timing.setup_s = loaded - started - timing.prefill_s
        steps = session.run(max_new_tokens - 1, self.sync_interval if graphs else 1)
        tokens, probs = session.results(steps + 1)
        timing.decode_s = time.perf_counter() - loaded
        timing.decode_steps = steps
        return trim_at_stop(tokens, probs, stop_token_ids)

    def _prefilled_session(self, torch, model, tensors, max_new_tokens, stop_token_ids):
        """Prefill, then load the frame into its (maybe newly captured) session."""
        parts = text_model_parts(model)
        device = parts.embed_tokens.weight.device
        tensors = {name: value.to(device) if hasattr(value, 'to') else value
                   for name, value in tensors.items()}
        graphs = self._graphs_enabled(device)
        timing = self.last_timing = DecodeTiming()
        started = time.perf_counter()
        first_logits, cache, position_ids = self._prefill(model, tensors, device)
        _synchronize(torch, device)
        timing.prefill_s = time.perf_counter() - started

        batch, prompt_length = tensors['input_ids'].shape
        needed = prompt_length + max_new_tokens
        cache_len = -(-needed // self.cache_bucket) * self.cache_bucket
        session, timing.graph_captured = self._session(
            torch, model, parts, batch, cache_len, cache.layers[0].keys.dtype, device, graphs)
        session.load(cache, tensors['attention_mask'], position_ids, first_logits,
                     stop_token_ids)
        del cache, first_logits
        _synchronize(torch, device)
        return session, graphs

    def _graphs_enabled(self, device) -> bool:
        if device.type != 'cuda':
            if self.use_cuda_graphs:
                raise ValueError(f'CUDA graphs need a CUDA model, this one is on {device}')
            return False
        return True if self.use_cuda_graphs is None else bool(self.use_cuda_graphs)

    def _session(self, torch, model, parts, batch, cache_len, dtype, device, graphs):
        key = (id(model), batch, cache_len, dtype, str(device), graphs)
        session = self._sessions.get(key)
        if session is not None and session.model_ref is model:
            self._sessions.move_to_end(key)
            return session, False
        fuse = self.fuses_elementwise(graphs)
        nf4 = self._nf4_for(device)
        linears = {module: linear for module, linear, _ in self._nf4_linears_for(model, nf4)}
        session = _DecodeSession(torch, model, parts, batch, cache_len, dtype, device,
                                 self._kernels_for(torch, fuse), nf4, linears)
        if graphs:
            session.capture(self._capture_stream(torch, device))
            if session.nf4_matmul is None and nf4 is not None:
                self._nf4_failed = True  # the capture fell back: do not try it again
        self._sessions[key] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)[1].release()
        return session, graphs

    def fuses_elementwise(self, graphs: bool) -> bool:
        """Whether a session's elementwise pieces go through ``torch.compile``: as
        ``fuse_elementwise`` says, else with CUDA graphs where Triton imports. Without it (a
        JetPack torch may lack it) torch.compile cannot build CUDA code: every new session
        would try, warn and fall back; the graph replays the eager pieces instead."""
        if self.fuse_elementwise is not None:
            return bool(self.fuse_elementwise)
        return graphs and triton_missing_reason() is None

    def _nf4_for(self, device):
        """The fused NF4 matmul for ``device``, or None (bitsandbytes' own path). Whether
        the kernels can run on a device is found out once."""
        if self.nf4_kernel is False or self._nf4_failed:
            return None
        key = str(device)
        if key not in self._nf4_devices:
            from .nf4_matmul import NF4Matmul, kernel_unavailable_reason
            reason = kernel_unavailable_reason(device)
            if reason is not None and self.nf4_kernel:
                raise ValueError(reason)
            if reason is None and self._nf4_matmul is None:
                self._nf4_matmul = NF4Matmul()
            self._nf4_devices[key] = None if reason else self._nf4_matmul
        return self._nf4_devices[key]

    def _nf4_linears_for(self, model, nf4):
        """``[(module, its NF4Matmul linear, compute dtype)]`` for ``model``'s NF4 layers,
        made once per model (again when a layer's compute dtype changed); empty without
        ``nf4``. Prefill and every decode session share them."""
        if nf4 is None:
            return []
        cached = self._nf4_linears.get(model)
        if cached is None or any(getattr(module, 'compute_dtype', None) != dtype
                                 for module, _, dtype in cached):
            cached = []
            for module in model.modules():
                linear = nf4.linear_for(module)
                if linear is not None:
                    cached.append((module, linear, getattr(module, 'compute_dtype', None)))
            self._nf4_linears[model] = cached
        return cached

    def _prefill(self, model, tensors, device):
        """:func:`prefill` with the NF4 linears through :class:`NF4Matmul`. If that fails but
        bitsandbytes' own path works, and the kernel was only on by default, warn and keep
        this decoder on bitsandbytes from then on."""
        if self._nf4_for(device) is None:
            return prefill(model, tensors)
        try:
            with self._lean_nf4_linears(model, device):
                return prefill(model, tensors)
        except Exception as error:
            if self.nf4_kernel:
                raise
            result = prefill(model, tensors)  # a failure here is the model's own: raised
            warnings.warn(f'prefill through the fused NF4 kernels failed '
                          f"({type(error).__name__}: {error}); using bitsandbytes' own path",
                          RuntimeWarning)
            self._nf4_failed = True
            return result

    @contextlib.contextmanager
    def _lean_nf4_linears(self, model, device):
        """While active, the model's NF4 linears run through :class:`NF4Matmul`. Modules that
        already have a forward of their own (hooks) are left alone."""
        swapped = []
        try:
            for module, linear, _ in self._nf4_linears_for(model, self._nf4_for(device)):
                if 'forward' not in module.__dict__:
                    module.forward = linear
                    swapped.append(module)
            yield
        finally:
            for module in swapped:
                module.__dict__.pop('forward', None)

    def _capture_stream(self, torch, device):
        key = str(device)
        if key not in self._capture_streams:
            self._capture_streams[key] = torch.cuda.Stream(device=device)
        return self._capture_streams[key]

    def _kernels_for(self, torch, fuse: bool) -> '_Kernels':
        if fuse not in self._kernels:
            self._kernels[fuse] = _Kernels(torch, fuse)
        return self._kernels[fuse]


# -- prefill ----------------------------------------------------------------------------------

def text_model_parts(model) -> _TextModelParts:
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
    return _TextModelParts(
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
        tensors['mm_token_type_ids'] = (
            (input_ids == IMAGE_TOKEN_ID).long() + 2 * (input_ids == VIDEO_TOKEN_ID).long())
    # Text positions as generate makes them (left padding aware), then M-RoPE positions.
    text_positions = attention_mask.long().cumsum(-1) - 1
    text_positions = text_positions.masked_fill(attention_mask == 0, 0)
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


def _cache_argument(model) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return 'past_key_values'
    return 'cache' if 'cache' in parameters else 'past_key_values'


# -- the step's elementwise pieces (eager, or fused by torch.compile) ------------------------

def _rms_norm(torch, hidden, weight, eps: float):
    """Qwen3's RMSNorm, computed exactly as transformers does (fp32 statistics)."""
    dtype = hidden.dtype
    hidden32 = hidden.to(torch.float32)
    variance = hidden32.pow(2).mean(-1, keepdim=True)
    hidden32 = hidden32 * torch.rsqrt(variance + eps)
    return weight * hidden32.to(dtype)


def _rotate_half(torch, x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Kernels:
    """The step's elementwise functions; with ``fuse`` each is compiled (CUDA only)."""

    def __init__(self, torch, fuse: bool):
        self.torch = torch
        self.fused = fuse

        def rms_norm(hidden, weight, eps: float):
            return _rms_norm(torch, hidden, weight, eps)

        def add_rms_norm(hidden, delta, weight, eps: float):
            hidden = hidden + delta
            return hidden, _rms_norm(torch, hidden, weight, eps)

        def qk_norm_rope(q, k, q_weight, k_weight, eps: float, cos, sin):
            # q, k: (batch, 1, heads, head_dim) -> (batch, heads, 1, head_dim), normed, rotated
            q = _rms_norm(torch, q, q_weight, eps).transpose(1, 2)
            k = _rms_norm(torch, k, k_weight, eps).transpose(1, 2)
            cos = cos.unsqueeze(1)
            sin = sin.unsqueeze(1)
            return (q * cos + _rotate_half(torch, q) * sin,
                    k * cos + _rotate_half(torch, k) * sin)

        def attention_mask(key_valid, key_index, cache_position, neg):
            valid = key_valid & (key_index <= cache_position)
            return torch.where(valid, torch.zeros_like(neg), neg)[:, None, None, :]

        def pick(logits, finished, stop_ids, pad_id):
            """Greedy token, its probability, and who has finished (fp32 logits)."""
            logits = logits.float()
            best = torch.argmax(logits, dim=-1)
            prob = torch.exp(logits.amax(dim=-1) - torch.logsumexp(logits, dim=-1))
            best = torch.where(finished, pad_id, best)
            prob = torch.where(finished, torch.ones_like(prob), prob)
            done = finished | (best.unsqueeze(-1) == stop_ids).any(-1)
            return best, prob, done

        self.rms_norm = rms_norm
        self.add_rms_norm = add_rms_norm
        self.qk_norm_rope = qk_norm_rope
        self.attention_mask = attention_mask
        self.pick = pick
        self.pick_eager = pick
        if fuse:
            compile_options = dict(fullgraph=True, dynamic=False)
            self.rms_norm = torch.compile(rms_norm, **compile_options)
            self.add_rms_norm = torch.compile(add_rms_norm, **compile_options)
            self.qk_norm_rope = torch.compile(qk_norm_rope, **compile_options)
            self.attention_mask = torch.compile(attention_mask, **compile_options)
            self.pick = torch.compile(pick, **compile_options)

    def act_mul(self, mlp, gate, up):
        """``act(gate) * up``, fused for SiLU."""
        fn = getattr(self, '_act_mul', None)
        if fn is None:
            act = mlp.act_fn
            torch = self.torch

            def act_mul(gate, up):
                return act(gate) * up

            fn = torch.compile(act_mul, fullgraph=True, dynamic=False) if self.fused else act_mul
            self._act_mul = fn
        return fn(gate, up)


# -- one (batch size, cache length) decode session: static buffers and its CUDA graph -------

class _DecodeSession:
    """Static KV cache, state buffers and the (optionally graph-captured) decode step."""

    def __init__(self, torch, model, parts: _TextModelParts, batch: int, cache_len: int, dtype,
                 device, kernels: _Kernels, nf4_matmul=None, linears=None):
        self.torch = torch
        self.model_ref = model
        self.parts = parts
        self.kernels = kernels
        self.nf4_matmul = nf4_matmul
        self.linears = dict(linears or {})  # module -> its NF4Matmul linear
        self.batch = batch
        self.cache_len = cache_len
        self.device = device
        self.dtype = dtype
        shape = (batch, parts.num_kv_heads, cache_len, parts.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in parts.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in parts.layers]
        long = dict(dtype=torch.long, device=device)
        self.token = torch.zeros(batch, **long)
        self.position = torch.zeros(3, batch, **long)
        self.cache_position = torch.zeros(1, **long)
        self.step_index = torch.zeros(1, **long)
        self.key_index = torch.arange(cache_len, **long)
        self.key_valid = torch.ones(batch, cache_len, dtype=torch.bool, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.stop_ids = torch.full((MAX_STOP_IDS,), _NO_TOKEN, **long)
        self.pad_id = torch.zeros((), **long)
        self.neg = torch.full((batch, cache_len), torch.finfo(dtype).min, dtype=dtype,
                              device=device)
        self.out_tokens = torch.zeros(batch, cache_len + 1, **long)
        self.out_probs = torch.zeros(batch, cache_len + 1, dtype=torch.float32, device=device)
        self.graph = None

    def load(self, cache, attention_mask, position_ids, first_logits, stop_token_ids):
        """Put a prefilled frame (batch) into the static buffers."""
        torch = self.torch
        length = attention_mask.shape[1]
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            keys[:, :, :length].copy_(cache.layers[layer].keys)
            values[:, :, :length].copy_(cache.layers[layer].values)
        self.key_valid.fill_(True)
        self.key_valid[:, :length].copy_(attention_mask.bool())
        self.cache_position.fill_(length)
        self.position.copy_(position_ids[:, :, -1] + 1)
        stops = stop_token_ids + [_NO_TOKEN] * (MAX_STOP_IDS - len(stop_token_ids))
        self.stop_ids.copy_(torch.tensor(stops, dtype=torch.long))
        self.pad_id.fill_(stop_token_ids[0] if stop_token_ids else 0)
        self.finished.fill_(False)
        best, prob, done = self.kernels.pick_eager(first_logits, self.finished, self.stop_ids,
                                                   self.pad_id)
        self.token.copy_(best)
        self.out_tokens[:, 0].copy_(best)
        self.out_probs[:, 0].copy_(prob)
        self.finished.copy_(done)
        self.step_index.fill_(1)

    def project(self, module, x):
        """``module(x)``, through the fused NF4 kernel where it applies."""
        return self.linears.get(module, module)(x)

    def step(self):
        """Feed ``token`` at ``cache_position``; record the next token; advance the state."""
        torch = self.torch
        parts, kernels, project = self.parts, self.kernels, self.project
        batch, head_dim = self.batch, parts.head_dim
        groups = parts.num_heads // parts.num_kv_heads
        hidden = parts.embed_tokens(self.token).unsqueeze(1)
        cos, sin = parts.rotary_emb(hidden, self.position.unsqueeze(-1))
        mask = kernels.attention_mask(self.key_valid, self.key_index, self.cache_position,
                                      self.neg)
        first_norm = parts.layers[0].input_layernorm
        normed = kernels.rms_norm(hidden, first_norm.weight, first_norm.variance_epsilon)
        # Each residual add is fused with the RMSNorm that follows it (the next layer's
        # input norm, or the final norm after the last layer).
        next_norms = [layer.input_layernorm for layer in parts.layers[1:]] + [parts.norm]
        for layer, next_norm, keys, values in zip(parts.layers, next_norms, self.keys,
                                                  self.values):
            attn = layer.self_attn
            q = project(attn.q_proj, normed).view(batch, 1, -1, head_dim)
            k = project(attn.k_proj, normed).view(batch, 1, -1, head_dim)
            v = project(attn.v_proj, normed).view(batch, 1, -1, head_dim)
            q, k = kernels.qk_norm_rope(q, k, attn.q_norm.weight, attn.k_norm.weight,
                                        attn.q_norm.variance_epsilon, cos, sin)
            keys.index_copy_(2, self.cache_position, k)
            values.index_copy_(2, self.cache_position, v.transpose(1, 2))
            # Grouped-query attention without copying the cache: the query heads that share
            # a key/value head become that head's "query positions".
            grouped = q.reshape(batch, parts.num_kv_heads, groups, head_dim)
            out = torch.nn.functional.scaled_dot_product_attention(
                grouped, keys, values, attn_mask=mask, scale=attn.scaling)
            norm = layer.post_attention_layernorm
            hidden, normed = kernels.add_rms_norm(
                hidden, project(attn.o_proj, out.reshape(batch, 1, -1)), norm.weight,
                norm.variance_epsilon)
            mlp = layer.mlp
            gated = kernels.act_mul(mlp, project(mlp.gate_proj, normed),
                                    project(mlp.up_proj, normed))
            hidden, normed = kernels.add_rms_norm(
                hidden, project(mlp.down_proj, gated), next_norm.weight,
                next_norm.variance_epsilon)
        logits = parts.lm_head(normed[:, 0])
        best, prob, done = kernels.pick(logits, self.finished, self.stop_ids, self.pad_id)
        self.out_tokens.index_copy_(1, self.step_index, best.unsqueeze(1))
        self.out_probs.index_copy_(1, self.step_index, prob.unsqueeze(1))
        self.finished.copy_(done)
        self.token.copy_(best)
        self.position.add_(1)
        self.cache_position.add_(1)
        self.step_index.add_(1)

    def capture(self, stream):
        """Warm up (compiles fused kernels, tunes the NF4 kernel, loads libraries) and
        capture ``step`` once on ``stream``."""
        torch = self.torch
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self.step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step()
        except Exception as error:
            if self.nf4_matmul is not None:
                warnings.warn(f'capturing the decode step failed ({type(error).__name__}: '
                              f'{error}); trying again without the fused NF4 kernel',
                              RuntimeWarning)
                self.nf4_matmul, self.linears = None, {}
                return self.capture(stream)
            if not self.kernels.fused:
                raise
            warnings.warn('fused decode kernels failed to compile or capture; '
                          'falling back to unfused ones', RuntimeWarning)
            self.kernels = _Kernels(torch, False)
            return self.capture(stream)
        self.graph = graph
        for buffer in self.keys + self.values:
            buffer.zero_()

    def run(self, max_steps: int, sync_interval: int) -> int:
        """Decode up to ``max_steps`` tokens after the first; returns the steps taken."""
        if max_steps <= 0 or bool(self.finished.all()):
            return 0
        advance = self.graph.replay if self.graph is not None else self.step
        for taken in range(1, max_steps + 1):
            advance()
            if taken % sync_interval == 0 and bool(self.finished.all()):
                return taken
        return max_steps

    def release(self) -> None:
        """Free the graph and every buffer now (not when the last reference goes)."""
        if self.graph is not None:
            self.graph.reset()
            self.graph = None
        self.keys, self.values = [], []
        self.linears = {}
        self.out_tokens = self.out_probs = self.neg = self.key_valid = None
        self.model_ref = None

    def results(self, count: int):
        tokens = self.out_tokens[:, :count].tolist()
        probs = self.out_probs[:, :count].tolist()
        return tokens, probs


def _synchronize(torch, device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
