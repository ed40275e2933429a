"""One decode session: the static KV cache and state buffers of one (batch size, cache
length) shape, the hand-written decode step over the language model's own modules, its CUDA
graph and the prefill shapes (``static_prefill.py``) that write into its cache, all of whose
graphs share one memory pool.

Each new token goes through :meth:`DecodeSession.step`: norms, projections, MLP, rotary
embedding and ``lm_head`` of the model itself, so plain, bitsandbytes 4-bit and other
``nn.Module`` linears all work (a linear found in ``linears`` runs through its fused NF4
replacement instead, and a tuple of modules found in ``groups``, a layer's q, k and v or gate
and up, through one launch). All three M-RoPE components of a text token after the prompt are
``last prompt position + 1 + step``. Greedy argmax; each chosen token's softmax probability is
kept (over the non-zero rows only, exactly, for a head whose rows are mostly zero:
:mod:`~qwen_vl_perception.model.compact_head`). The elementwise pieces (:class:`StepKernels`)
run eagerly or fused by ``torch.compile``.
:meth:`DecodeSession.capture` raises when capturing fails; the decoder decides what to fall
back to (``fast_decode.py``).
"""
from collections import OrderedDict
from typing import Optional, Sequence

from . import cuda_graphs
from .nf4_weights import nf4_weight
from .generation import DecodeStep, StepHook, trim_at_stop
from .qwen3_vl_prefill import TextModelParts

MAX_STOP_IDS = 8
"""Stop ids live in a fixed-size device buffer so that one captured graph serves any set."""
_NO_TOKEN = -1


class FoldFailed(RuntimeError):
    """A decode step's NF4 launch with folded elementwise work failed (the cause chained)."""


def _rms_norm(torch, hidden, weight, eps: float):
    """Qwen3's RMSNorm, computed exactly as transformers does (fp32 statistics)."""
    dtype = hidden.dtype
    hidden32 = hidden.to(torch.float32)
    variance = hidden32.pow(2).mean(-1, keepdim=True)
    hidden32 = hidden32 * torch.rsqrt(variance + eps)
    return weight * hidden32.to(dtype)


def greedy(torch, logits):
    """``(argmax, softmax probability of it)`` per row of ``(rows, vocab)`` logits, in fp32.

    In two stages over parts of the vocabulary: a compiled one-stage argmax over 151,936
    logits runs one program per row (~34 us on an H200, ten times the rest of the pick). The
    first index of the maximum wins, as with ``torch.argmax``."""
    rows, vocab = logits.shape
    parts = next(count for count in (64, 32, 16, 8, 4, 2, 1) if vocab % count == 0)
    logits = logits.float().view(rows, parts, vocab // parts)
    part_best = torch.argmax(logits, dim=-1)
    part_top = logits.amax(dim=-1)
    part_sum = torch.logsumexp(logits, dim=-1)
    part = torch.argmax(part_top, dim=-1, keepdim=True)  # the first part holding the maximum
    best = part[:, 0] * (vocab // parts) + part_best.gather(1, part)[:, 0]
    prob = torch.exp(part_top.gather(1, part)[:, 0] - torch.logsumexp(part_sum, dim=-1))
    return best, prob


def _rotate_half(torch, x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


RECOMPILE_LIMIT = 64
"""Compilations allowed per compiled function (torch's default, 8, counts every decoder's
and every shape's: a process with sessions of many batch sizes, cache lengths or decoders
would otherwise reach it, and a capture would fail)."""


def allow_recompiles(torch, limit: int = RECOMPILE_LIMIT) -> None:
    """Raise ``torch._dynamo``'s per-function recompile limit to ``limit`` (never lower it).
    Each step piece is compiled once per shape (``dynamic=False``: one kernel per batch size
    and cache length) and again for each decoder, all against one limit per function."""
    config = torch._dynamo.config
    name = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'
    if getattr(config, name) < limit:
        setattr(config, name, limit)


class StepKernels:
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
            best, prob = greedy(torch, logits)
            return finish(best, prob, finished, stop_ids, pad_id)

        def finish(best, prob, finished, stop_ids, pad_id):
            """Pad finished rows; mark the rows whose token is a stop token as finished."""
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
        self.finish = finish
        if fuse:
            allow_recompiles(torch)
            compile_options = dict(fullgraph=True, dynamic=False)
            self.rms_norm = torch.compile(rms_norm, **compile_options)
            self.add_rms_norm = torch.compile(add_rms_norm, **compile_options)
            self.qk_norm_rope = torch.compile(qk_norm_rope, **compile_options)
            self.attention_mask = torch.compile(attention_mask, **compile_options)
            self.pick = torch.compile(pick, **compile_options)
            self.finish = torch.compile(finish, **compile_options)

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


def _decode_attention_for(torch, kernels, batch, parts, cache_len, dtype, device,
                          overlap: bool = False):
    """The step's attention through :mod:`decode_attention` (fused steps on CUDA with Triton,
    bf16/fp16, head sizes 16-256 in powers of two, up to 16 query heads per key head), or None
    for ``scaled_dot_product_attention``; ``overlap``: with programmatic dependent launch where
    the GPU has it. A kernel that fails fails the step's warm-up or
    capture; ``KernelChoices.capture`` then drops it (``without_decode_attention``) and
    remembers that, and the unfused step never uses it."""
    head_dim, groups = parts.head_dim, parts.num_heads // parts.num_kv_heads
    if not (kernels.fused and torch.device(device).type == 'cuda'
            and dtype in (torch.bfloat16, torch.float16) and 16 <= head_dim <= 256
            and head_dim & (head_dim - 1) == 0 and groups <= 16):
        return None
    try:
        from .decode_attention import overlap_supported
        return decode_attention_step(torch, batch, parts, cache_len, device,
                                     overlap=overlap and overlap_supported(device))
    except ImportError:
        return None


def decode_attention_step(torch, batch, parts, cache_len, device, split=None,
                          overlap: bool = False):
    """``attention(q, keys, values, key_valid, cache_position, scale, new_keys, new_values,
    norm_rope)`` through :mod:`decode_attention` with its own workspace: q and this step's key
    before Qwen3's q/k norm and rotary embedding, which the kernel applies; it writes the key
    and value into the cache (no checks of the device or dtype here: see
    :func:`_decode_attention_for`). ``split``: keys per part (by default
    :func:`decode_attention.split_for` this GPU); ``overlap``: launched with programmatic
    dependent launch (sm_90+ only)."""
    from . import decode_attention
    head_dim = parts.head_dim
    split = split or decode_attention.split_for(
        batch, parts.num_kv_heads, cache_len,
        torch.cuda.get_device_properties(device).multi_processor_count)
    workspace = torch.empty(decode_attention.workspace_floats(
        batch, parts.num_kv_heads, cache_len, head_dim, split), dtype=torch.float32,
        device=device)
    locks = torch.zeros(batch * parts.num_kv_heads, dtype=torch.int32, device=device)

    def attention(q, keys, values, key_valid, cache_position, scale, new_keys, new_values,
                  norm_rope):
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        q_weight, k_weight, eps, cos, sin = norm_rope
        decode_attention.launch(
            _last_contiguous(q), keys, values, key_valid, cache_position, out, workspace, locks,
            float(scale), new_keys=_last_contiguous(new_keys),
            new_values=_last_contiguous(new_values),
            norm_rope=(_last_contiguous(q_weight), _last_contiguous(k_weight), eps,
                       _last_contiguous(cos), _last_contiguous(sin)), split=split,
            overlap=overlap)
        return out
    return attention


def _is_silu(torch, act_fn) -> bool:
    """Whether ``act_fn`` computes SiLU (on a few values across its range, on the CPU)."""
    probe = torch.linspace(-8, 8, 33)
    try:
        return bool(torch.allclose(act_fn(probe), torch.nn.functional.silu(probe)))
    except Exception:  # an activation that does not take a CPU tensor: not ours to fold
        return False


def _last_contiguous(tensor):
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


class DecodeSession:
    """Static KV cache, state buffers and the (optionally graph-captured) decode step."""

    def __init__(self, torch, model, parts: TextModelParts, batch: int, cache_len: int, dtype,
                 device, kernels: StepKernels, nf4_matmul=None, linears=None,
                 compact_head=None, groups=None, decode_attention: bool = True,
                 overlap_launches: bool = False, fold_elementwise: bool = False,
                 fold_act_out: bool = True):
        self.torch = torch
        self.model_ref = model
        self.parts = parts
        self.kernels = kernels
        self.nf4_matmul = nf4_matmul
        self.linears = dict(linears or {})  # module -> its NF4Matmul linear
        self.groups = dict(groups or {})  # (modules sharing an input) -> one NF4Matmul launch
        self.compact_head = compact_head  # a CompactHead for a mostly-zero vocabulary, or None
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
        self.attention = _decode_attention_for(
            torch, kernels, batch, parts, cache_len, dtype, device,
            overlap_launches) if decode_attention else None
        self.fold_elementwise = bool(fold_elementwise)
        self._folds = None  # per layer, its four launches' NF4 weights; [] when not folding
        self.fold_act_out = bool(fold_act_out)
        self.act_out_folded = False
        """Whether the folded step's gate+up launches write SiLU(gate) * up themselves
        (``fold_act_out``, where every layer's gate+up has a launch shape for it and the MLP's
        activation is SiLU) rather than leave it to a kernel of its own."""
        self.squares = None  # the residual stream's sums of squares per 16 columns (folding)
        self.normed = None  # the next norm's weight times the residual stream (folding)
        self.graph = None
        self.pool = None  # the memory pool of this session's CUDA graphs (step and prefills)
        self.prefills = OrderedDict()  # shape -> its StaticPrefill (static_prefill.py)

    def load(self, cache, attention_mask, position_ids, first_logits, stop_token_ids):
        """Put a prefilled frame (batch) into the static buffers: ``cache`` (a
        ``DynamicCache``) is copied into the static cache."""
        length = attention_mask.shape[1]
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            keys[:, :, :length].copy_(cache.layers[layer].keys)
            values[:, :, :length].copy_(cache.layers[layer].values)
        self.load_prefilled(attention_mask, position_ids[:, :, -1], first_logits,
                            stop_token_ids)

    def load_prefilled(self, attention_mask, last_positions, first_logits, stop_token_ids):
        """Start decoding a frame whose prompt is in the static cache already (a
        :class:`~qwen_vl_perception.model.static_prefill.StaticPrefill` wrote it there):
        ``last_positions`` are the (3, batch) M-RoPE positions of its last prompt token."""
        torch = self.torch
        length = attention_mask.shape[1]
        self.key_valid.fill_(True)
        self.key_valid[:, :length].copy_(attention_mask.bool())
        self.cache_position.fill_(length)
        self.position.copy_(last_positions + 1)
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

    def project_all(self, modules, x):
        """``[module(x) for module in modules]``, one launch where they form an NF4 group."""
        group = self.groups.get(modules)
        if group is not None:
            return group(x)
        return [self.project(module, x) for module in modules]

    @property
    def folds(self) -> bool:
        """Whether the step folds its residual adds and RMSNorms into the NF4 launches
        (:meth:`NF4Matmul.folded`): o and down add their product to the residual stream and
        write, beside it, the next norm's weight times it and its sums of squares, from which
        q+k+v and gate+up scale their sums by 1 / rms; per layer four launches, the attention
        kernel and SiLU(gate) x up (written by gate+up itself with ``fold_act_out``). Decided
        at the first step: every layer's projections through the CUDA NF4 kernel (a timed CUDA
        shape that can fold), the decode attention kernel, fused elementwise kernels, bf16
        layers and norms (the products bf16 or fp16). A folded launch that fails raises
        :class:`FoldFailed`, which graph capture (``KernelChoices.capture``) turns into an
        unfolded step; an eager step raises it as is."""
        if self._folds is None:
            self._folds = self._fold_weights()
            if self._folds:
                hidden = self._folds[0][1][0].out_features
                self.squares = self.torch.empty(hidden, dtype=self.torch.float32,
                                                device=self.device)
                self.normed = self.torch.empty(self.batch, hidden, dtype=self.dtype,
                                               device=self.device)
        return bool(self._folds)

    def _fold_weights(self) -> list:
        nf4, parts = self.nf4_matmul, self.parts
        if not (self.fold_elementwise and nf4 is not None and self.attention is not None
                and self.kernels.fused and self.torch.device(self.device).type == 'cuda'):
            return []
        layers = []
        for layer in parts.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm, layer.post_attention_layernorm, parts.norm)
            # bf16 only: the folded norm multiplies h by its weight before 1 / rms, which in
            # fp16 could overflow where transformers' fp32 statistics do not
            if self.dtype != self.torch.bfloat16 or any(norm.weight.dtype != self.dtype
                                                        for norm in norms):
                return []
            launches = []
            for modules in ((attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,),
                            (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)):
                if len(modules) > 1 and modules not in self.groups:
                    return []
                if any(self.linears.get(module, module) is module for module in modules):
                    return []
                weights = [nf4_weight(module) for module in modules]
                # bf16 layers with fp16 compute (the article's model) fold too: the kernel
                # does the elementwise work in bf16 and the products in fp16
                if any(weight is None or weight.compute_dtype not in (
                        self.dtype, self.torch.float16) for weight in weights) \
                        or not nf4.foldable(self.batch, weights, dtype=self.dtype):
                    return []
                launches.append(weights)
            layers.append(launches)
        self.act_out_folded = self.fold_act_out and all(
            _is_silu(self.torch, layer.mlp.act_fn) and nf4.foldable(
                self.batch, launches[2], act_out=True, dtype=self.dtype)
            for layer, launches in zip(parts.layers, layers))
        return layers

    def without_folds(self) -> None:
        """Launch the step's elementwise work apart from now on (after a failure)."""
        self._folds, self.squares, self.normed = [], None, None
        self.act_out_folded = False

    def without_act_out(self) -> None:
        """Still folded, but SiLU(gate) * up by a kernel of its own (after a failure)."""
        self.fold_act_out = self.act_out_folded = False

    def _folded_layers(self, hidden, cos, sin):
        """The layers with their elementwise work folded into the NF4 launches (``folds``):
        ``hidden`` (batch, 1, hidden size) is updated in place; returns the final norm's
        output."""
        parts, nf4, squares = self.parts, self.nf4_matmul, self.squares
        batch, head_dim = self.batch, parts.head_dim
        groups = parts.num_heads // parts.num_kv_heads
        stream = hidden.view(batch, -1)

        def folded(x, weights, **fold):
            try:
                return nf4.folded(x, weights, **fold)
            except Exception as error:
                raise FoldFailed(f'a folded NF4 launch failed ({type(error).__name__}: '
                                 f'{error})') from error

        first = parts.layers[0].input_layernorm
        normed = self.kernels.rms_norm(hidden, first.weight, first.variance_epsilon)
        x = self.normed  # the next norm's weight times the stream, as o and down write it
        next_norms = [layer.input_layernorm for layer in parts.layers[1:]] + [None]
        for index, (layer, next_norm, (qkv, o, gate_up, down), keys, values) in enumerate(zip(
                parts.layers, next_norms, self._folds, self.keys, self.values)):
            attn = layer.self_attn
            if index == 0:
                q, k, v = nf4.grouped(normed.view(batch, -1), qkv)
            else:
                q, k, v = folded(x, qkv, scale=(layer.input_layernorm.variance_epsilon,
                                                squares))
            out = self.attention(
                q.view(batch, parts.num_kv_heads, groups, head_dim), keys, values,
                self.key_valid, self.cache_position, attn.scaling,
                k.view(batch, -1, head_dim), v.view(batch, -1, head_dim),
                (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.variance_epsilon,
                 cos[:, 0], sin[:, 0]))
            norm = layer.post_attention_layernorm
            folded(out.reshape(batch, -1), o, residual=(stream, squares),
                   norm_out=(norm.weight, x))
            if self.act_out_folded:
                gated, = folded(x, gate_up, scale=(norm.variance_epsilon, squares),
                                act_out=True)
            else:
                gate, up = folded(x, gate_up, scale=(norm.variance_epsilon, squares))
                gated = self.kernels.act_mul(layer.mlp, gate.view(batch, 1, -1),
                                             up.view(batch, 1, -1))
            folded(gated.view(batch, -1), down, residual=(stream, squares),
                   norm_out=None if next_norm is None else (next_norm.weight, x))
        return self.kernels.rms_norm(hidden, parts.norm.weight, parts.norm.variance_epsilon)

    def step(self):
        """Feed ``token`` at ``cache_position``; record the next token; advance the state."""
        torch = self.torch
        parts, kernels, project = self.parts, self.kernels, self.project
        batch, head_dim = self.batch, parts.head_dim
        groups = parts.num_heads // parts.num_kv_heads
        hidden = parts.embed_tokens(self.token).unsqueeze(1)
        cos, sin = parts.rotary_emb(hidden, self.position.unsqueeze(-1))
        mask = None  # the additive mask, for scaled_dot_product_attention only
        if self.folds:
            normed = self._folded_layers(hidden.contiguous(), cos, sin)
            self._pick(normed)
            return
        first_norm = parts.layers[0].input_layernorm
        normed = kernels.rms_norm(hidden, first_norm.weight, first_norm.variance_epsilon)
        # Each residual add is fused with the RMSNorm that follows it (the next layer's
        # input norm, or the final norm after the last layer).
        next_norms = [layer.input_layernorm for layer in parts.layers[1:]] + [parts.norm]
        for layer, next_norm, keys, values in zip(parts.layers, next_norms, self.keys,
                                                  self.values):
            attn = layer.self_attn
            q, k, v = (out.view(batch, 1, -1, head_dim) for out in self.project_all(
                (attn.q_proj, attn.k_proj, attn.v_proj), normed))
            if self.attention is not None and kernels.fused:
                # q/k norm and rotation, this step's key and value into the cache and the
                # attention over keys up to this position only: one kernel
                out = self.attention(
                    q.view(batch, parts.num_kv_heads, groups, head_dim), keys, values,
                    self.key_valid, self.cache_position, attn.scaling, k[:, 0], v[:, 0],
                    (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.variance_epsilon,
                     cos[:, 0], sin[:, 0]))
            else:
                q, k = kernels.qk_norm_rope(q, k, attn.q_norm.weight, attn.k_norm.weight,
                                            attn.q_norm.variance_epsilon, cos, sin)
                # Grouped-query attention without copying the cache: the query heads that
                # share a key/value head become that head's "query positions".
                grouped = q.reshape(batch, parts.num_kv_heads, groups, head_dim)
                keys.index_copy_(2, self.cache_position, k)
                values.index_copy_(2, self.cache_position, v.transpose(1, 2))
                if mask is None:
                    mask = kernels.attention_mask(self.key_valid, self.key_index,
                                                  self.cache_position, self.neg)
                out = torch.nn.functional.scaled_dot_product_attention(
                    grouped, keys, values, attn_mask=mask, scale=attn.scaling)
            norm = layer.post_attention_layernorm
            hidden, normed = kernels.add_rms_norm(
                hidden, project(attn.o_proj, out.reshape(batch, 1, -1)), norm.weight,
                norm.variance_epsilon)
            mlp = layer.mlp
            gated = kernels.act_mul(mlp, *self.project_all((mlp.gate_proj, mlp.up_proj), normed))
            hidden, normed = kernels.add_rms_norm(
                hidden, project(mlp.down_proj, gated), next_norm.weight,
                next_norm.variance_epsilon)
        self._pick(normed)

    def _pick(self, normed):
        """The next token from the final norm's output; the state advanced."""
        kernels, parts = self.kernels, self.parts
        if self.compact_head is not None:
            best, prob = self.compact_head.best(normed[:, 0])
            best, prob, done = kernels.finish(best, prob, self.finished, self.stop_ids,
                                              self.pad_id)
        else:
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
        capture ``step`` once on ``stream``. A failure is raised as is."""
        torch = self.torch
        with cuda_graphs.capturing(self):
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self.step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool()):
                self.step()
            self.graph = graph
        for buffer in self.keys + self.values:
            buffer.zero_()

    def graph_pool(self):
        """The memory pool that this session's graphs share (they never run at once)."""
        if self.pool is None:
            self.pool = self.torch.cuda.graph_pool_handle()
        return self.pool

    def without_decode_attention(self) -> None:
        """Attend through ``scaled_dot_product_attention`` from now on (after a failure)."""
        self.attention = None
        self.without_folds()

    def without_nf4(self) -> None:
        """Route every linear through its own module from now on (after a failed capture)."""
        self.nf4_matmul, self.linears, self.groups = None, {}, {}
        self.without_folds()
        self.drop_prefills()

    def drop_prefills(self) -> None:
        """Free the prefill shapes (their graphs may hold kernels that are given up)."""
        while self.prefills:
            self.prefills.popitem()[1].release()

    @property
    def nf4_layers(self) -> int:
        """How many linears of the step run through the fused NF4 replacement."""
        return sum(linear is not module for module, linear in self.linears.items())

    @property
    def nf4_groups(self) -> int:
        """How many groups of linears sharing an input run as one launch each."""
        return len(self.groups)

    def run(self, max_steps: int, sync_interval: int, on_step: Optional[StepHook] = None,
            stop_token_ids: Sequence[int] = ()) -> int:
        """Decode up to ``max_steps`` tokens after the first; returns the steps taken.
        ``on_step`` is told about the first token and every later one (no device
        synchronisation unless it asks for the tokens); False from it stops here."""
        def told(count: int) -> bool:
            if on_step is None:
                return True
            return bool(on_step(DecodeStep(count, lambda: trim_at_stop(
                *self.results(count), stop_token_ids)[0])))
        if not told(1) or max_steps <= 0 or bool(self.finished.all()):
            return 0
        advance = self.graph.replay if self.graph is not None else self.step
        for taken in range(1, max_steps + 1):
            advance()
            if not told(taken + 1):
                return taken
            if taken % sync_interval == 0 and bool(self.finished.all()):
                return taken
        return max_steps

    def release(self) -> None:
        """Free the graphs and every buffer now (not when the last reference goes)."""
        self.drop_prefills()
        if self.graph is not None:
            self.graph.reset()
            self.graph = None
        self.keys, self.values = [], []
        self.linears, self.groups = {}, {}
        self.compact_head = None
        self.out_tokens = self.out_probs = self.neg = self.key_valid = None
        self.model_ref = None

    def results(self, count: int):
        tokens = self.out_tokens[:, :count].tolist()
        probs = self.out_probs[:, :count].tolist()
        return tokens, probs
