"""Fast greedy decoding for Qwen3-VL: a static-cache prefill, then a lean decode loop.

:class:`FastGreedyDecoder` has the :class:`~qwen_vl_perception.model.generation.Decoder`
signature and computes what ``model.generate`` greedy (``hf_decode``) computes: in float32 the
same tokens; in bf16/fp16 its kernels round differently, so near-tied logits can flip:

1. Prefill fills a static cache of ``(batch, kv_heads, cache_len, head_dim)`` buffers. With
   CUDA graphs (``static_prefill`` None, the default) the model's own modules write the prompt
   straight into it, the prompt padded on the right to a multiple of ``prefill_bucket``
   tokens, and that computation (vision tower included) is captured in a CUDA graph per
   (batch, padded length, image grids, left padding or not) and replayed for later frames of
   that shape (:mod:`~qwen_vl_perception.model.static_prefill`): the model's forward is bound
   by launching thousands of small kernels from Python. Elsewhere (the CPU, or after the
   static prefill failed once) the model's normal multimodal ``forward`` (vision tower,
   deepstack, M-RoPE positions exactly as ``generate`` builds them) runs into a
   ``DynamicCache`` whose keys and values are then copied into the static cache.
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
4. On CUDA the step's bitsandbytes NF4 linears run through one Triton kernel
   (:mod:`~qwen_vl_perception.model.nf4_matmul`) that decodes the 4-bit weight in registers
   once for every sequence of the batch (bitsandbytes dequantizes whole weights to bf16 first
   for two or more); a layer's q, k and v projections share one launch, and so do gate and
   up. During prefill the NF4 linears of the whole model dequantize with one
   kernel each and multiply with ``linear``, skipping bitsandbytes' Python layers.
   ``nf4_kernel=False`` keeps bitsandbytes' own path everywhere.

Sequences that produce a stop token keep decoding (their outputs are masked and dropped) until
all are done or ``max_new_tokens`` is reached; batches are left padded, as ``InputBuilder``
makes them.

The parts live in their own files: ``qwen3_vl_prefill.py`` (the model's modules and its
own prefill), ``static_prefill.py`` (the prefill into the static cache, and its graphs),
``decode_session.py`` (static buffers, the step, the CUDA graph),
``kernel_choices.py`` (which optional kernels run, and their fallbacks); this file is the
policy that puts them together.
"""
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .decode_session import MAX_STOP_IDS, DecodeSession, StepKernels
from .generation import StepHook, trim_at_stop
from .kernel_choices import KernelChoices
from .qwen3_vl_prefill import TextModelParts, prefill, text_model_parts
from .static_prefill import StaticPrefill, frame_inputs
from .torch_support import require_torch

__all__ = ['DecodeTiming', 'FastGreedyDecoder', 'MAX_STOP_IDS', 'TextModelParts', 'prefill',
           'text_model_parts']


@dataclass
class DecodeTiming:
    """Seconds spent in the last call (host clock, device synchronised at each boundary)."""

    prefill_s: float = 0.0
    setup_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    graph_captured: bool = False
    prefill: str = ''
    """How the prompt was prefilled: 'graphed' (a static prefill's CUDA graph), 'static' (the
    same computation, eager) or 'model' (the model's own forward into a DynamicCache)."""
    prefill_captured: bool = False
    """Whether this call captured the prefill's graph (its first frame of that shape)."""

    @property
    def decode_ms_per_token(self) -> float:
        return 1000.0 * self.decode_s / self.decode_steps if self.decode_steps else 0.0


class FastGreedyDecoder:
    """Greedy decoder with a static KV cache and, on CUDA, CUDA-graph replay.

    ``use_cuda_graphs``: ``None`` means "on CUDA, yes"; ``fuse_elementwise``: ``None``
    means "with CUDA graphs, when Triton imports" (:meth:`fuses_elementwise`). The cache
    length is the prompt plus ``max_new_tokens`` rounded up to ``cache_bucket`` tokens so that
    frames of slightly different prompt lengths share one captured graph. On CUDA the loop
    checks whether every sequence has stopped once per ``sync_interval`` tokens (each check
    is a device synchronisation). ``max_sessions`` captured graphs are kept (least recently
    used dropped). ``nf4_kernel``: ``None`` means "on CUDA when Triton is there, until it
    fails once" (then a warning, and bitsandbytes' path). ``static_prefill``: ``None`` means
    "with CUDA graphs, graphed, until it fails once" (then a warning, and the model's own
    forward), True "always (eagerly without graphs), failures raised", False "the model's own
    forward"; each session keeps ``max_prefill_shapes`` prefill graphs, in the memory pool of
    its step's graph. Warm-up and kernel tuning before
    each capture run on one side stream per device, so that the CUDA libraries' per-stream
    workspaces are not allocated again for every capture (the capture itself uses PyTorch's
    capture stream). ``overlap_launches`` (``None``: on): the NF4 and decode attention kernels
    start with programmatic dependent launch on GPUs of compute capability 9.0+ (their first
    loads overlap the end of the kernel before them). ``fold_elementwise``: the decode step
    folds its residual adds and RMSNorms into the NF4 kernel's launches where it can
    (``DecodeSession.folds``); ``None`` means "with CUDA graphs, where the launches overlap"
    (folded and overlapped is the fastest step measured on the H200, each alone is not,
    ``results/benchmark/README.md``; on a GPU without programmatic launch, such as a Jetson
    Orin, neither is on by default); ``fold_act_out`` (``None``: on): a folded step's gate+up
    launches write SiLU(gate) * up themselves (``DecodeSession.act_out_folded``).
    ``fuse_prefill`` (``None``: on): the static prefill's layers run their norms, residual adds
    and SiLU x up through the session's step kernels (compiled per prefill shape where the
    step's are; CUDA, where the static prefill runs). The instance is callable like
    ``hf_decode``; not thread-safe (the engine serialises calls).
    """

    def __init__(self, use_cuda_graphs: Optional[bool] = None,
                 fuse_elementwise: Optional[bool] = None, cache_bucket: int = 256,
                 sync_interval: int = 8, max_sessions: int = 4,
                 nf4_kernel: Optional[bool] = None, static_prefill: Optional[bool] = None,
                 prefill_bucket: int = 64, max_prefill_shapes: int = 4,
                 overlap_launches: Optional[bool] = None,
                 fold_elementwise: Optional[bool] = None,
                 fold_act_out: Optional[bool] = None,
                 fuse_prefill: Optional[bool] = None):
        if min(cache_bucket, sync_interval, max_sessions, prefill_bucket,
               max_prefill_shapes) < 1:
            raise ValueError('cache_bucket, sync_interval, max_sessions, prefill_bucket and '
                             'max_prefill_shapes must be positive')
        self.use_cuda_graphs = use_cuda_graphs
        self.cache_bucket = int(cache_bucket)
        self.sync_interval = int(sync_interval)
        self.max_sessions = int(max_sessions)
        self.prefill_bucket = int(prefill_bucket)
        self.max_prefill_shapes = int(max_prefill_shapes)
        self.kernel_choices = KernelChoices(nf4_kernel, fuse_elementwise, static_prefill,
                                            overlap_launches, fold_elementwise, fold_act_out,
                                            fuse_prefill)
        """Which optional kernels run and what fell back (:class:`KernelChoices`)."""
        self.last_timing = DecodeTiming()
        self._capture_streams: Dict[str, object] = {}
        self._sessions: 'OrderedDict[tuple, DecodeSession]' = OrderedDict()
        self._kernels: Dict[bool, StepKernels] = {}

    def __call__(self, model, inputs, max_new_tokens: int, stop_token_ids: Sequence[int],
                 on_step: Optional[StepHook] = None
                 ) -> Tuple[List[List[int]], List[List[float]]]:
        """``on_step``: called after every token (between two graph replays); False stops."""
        torch = require_torch()
        if max_new_tokens < 1:
            raise ValueError('max_new_tokens must be at least 1')
        stop_token_ids = [int(token) for token in stop_token_ids]
        if len(stop_token_ids) > MAX_STOP_IDS:
            raise ValueError(f'at most {MAX_STOP_IDS} stop token ids, got {len(stop_token_ids)}')
        tensors = dict(getattr(inputs, 'tensors', inputs))
        with torch.inference_mode():
            return self._decode(torch, model, tensors, int(max_new_tokens), stop_token_ids,
                                on_step)

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
        self.kernel_choices.forget_models()

    # -- what the last call ran (for tools that report it) --------------------------------

    @property
    def session_count(self) -> int:
        """How many decode sessions (static caches, captured graphs) are kept now."""
        return len(self._sessions)

    @property
    def last_prefill_fused(self) -> bool:
        """Whether the last call's static prefill ran its layers' norms, residual adds and
        SiLU x up through compiled step kernels (``fuse_prefill``)."""
        session = self._last_session()
        if session is None or not session.prefills:
            return False
        kernels = next(reversed(session.prefills.values())).kernels
        return bool(kernels is not None and kernels.fused)

    @property
    def last_session_fused(self) -> bool:
        """Whether the session of the last call runs its elementwise pieces fused by
        ``torch.compile`` (False before any call, after :meth:`clear`, or after a fallback)."""
        session = self._last_session()
        return bool(session is not None and session.kernels.fused)

    @property
    def last_session_folds(self) -> bool:
        """Whether the session of the last call folds its elementwise work into the NF4
        launches (``DecodeSession.folds``; False before any call or after :meth:`clear`)."""
        session = self._last_session()
        return bool(session is not None and session.folds)

    @property
    def last_session_folds_act_out(self) -> bool:
        """Whether the folded step of the last call has its gate+up launches write SiLU(gate)
        * up (``fold_act_out``, ``DecodeSession.act_out_folded``)."""
        session = self._last_session()
        return bool(session is not None and session.folds and session.act_out_folded)

    @property
    def last_session_nf4_layers(self) -> int:
        """How many NF4 layers the session of the last call routes through
        :class:`~qwen_vl_perception.model.nf4_matmul.NF4Matmul`; 0 before any call or after
        :meth:`clear`."""
        session = self._last_session()
        return 0 if session is None else session.nf4_layers

    @property
    def last_session_nf4_groups(self) -> int:
        """How many groups of NF4 layers sharing an input (a layer's q, k, v; gate, up) the
        session of the last call runs as one launch each; 0 before any call."""
        session = self._last_session()
        return 0 if session is None else session.nf4_groups

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

    def _last_session(self) -> Optional[DecodeSession]:
        """The session used most recently (sessions move to the end when used)."""
        return next(reversed(self._sessions.values()), None)

    # -- the call ------------------------------------------------------------------------

    def _decode(self, torch, model, tensors, max_new_tokens, stop_token_ids, on_step=None):
        started = time.perf_counter()
        session, graphs = self._prefilled_session(torch, model, tensors, max_new_tokens,
                                                  stop_token_ids)
        loaded = time.perf_counter()
        timing = self.last_timing
        timing.setup_s = loaded - started - timing.prefill_s
        steps = session.run(max_new_tokens - 1, self.sync_interval if graphs else 1,
                            on_step, stop_token_ids)
        tokens, probs = session.results(steps + 1)
        timing.decode_s = time.perf_counter() - loaded
        timing.decode_steps = steps
        return trim_at_stop(tokens, probs, stop_token_ids)

    def _prefilled_session(self, torch, model, tensors, max_new_tokens, stop_token_ids):
        """Prefill, then load the frame into its (maybe newly captured) session: through the
        static prefill where it applies (:meth:`KernelChoices.uses_static_prefill`), else the
        model's own forward."""
        parts = text_model_parts(model)
        device = parts.embed_tokens.weight.device
        graphs = self._graphs_enabled(device)
        timing = self.last_timing = DecodeTiming()
        batch, prompt_length = tensors['input_ids'].shape
        needed = prompt_length + max_new_tokens
        cache_len = -(-needed // self.cache_bucket) * self.cache_bucket
        if self.kernel_choices.uses_static_prefill(graphs):
            session = self._statically_prefilled(torch, model, parts, tensors, cache_len,
                                                 device, graphs, stop_token_ids)
            if session is not None:
                return session, graphs

        tensors = {name: value.to(device) if hasattr(value, 'to') else value
                   for name, value in tensors.items()}
        started = time.perf_counter()
        first_logits, cache, position_ids = self.kernel_choices.prefill(prefill, model, tensors,
                                                                        device)
        _synchronize(torch, device)
        timing.prefill_s = time.perf_counter() - started
        timing.prefill = 'model'
        session, timing.graph_captured = self._session(
            torch, model, parts, batch, cache_len, cache.layers[0].keys.dtype, device, graphs)
        session.load(cache, tensors['attention_mask'], position_ids, first_logits,
                     stop_token_ids)
        del cache, first_logits
        _synchronize(torch, device)
        return session, graphs

    def _statically_prefilled(self, torch, model, parts, tensors, cache_len, device, graphs,
                              stop_token_ids) -> Optional[DecodeSession]:
        """The session with the frame prefilled by its :class:`StaticPrefill` of the frame's
        shape (made, and captured with ``graphs``, on first use); None where the static
        prefill does not apply or failed (then the model's own forward runs)."""
        timing = self.last_timing
        started = time.perf_counter()
        frame = frame_inputs(model, parts, tensors, self.prefill_bucket, cache_len)
        if frame is None:
            return None
        host_s = time.perf_counter() - started
        batch = frame.input_ids.shape[0]
        session, timing.graph_captured = self._session(
            torch, model, parts, batch, cache_len, parts.embed_tokens.weight.dtype, device,
            graphs)

        def attempt():
            shape = session.prefills.get(frame.key)
            if shape is None:
                shape = StaticPrefill(torch, model, parts, session, frame,
                                      self.kernel_choices.prefill_kernels(session))
                session.prefills[frame.key] = shape
                while len(session.prefills) > self.max_prefill_shapes:
                    session.prefills.popitem(last=False)[1].release()
            session.prefills.move_to_end(frame.key)
            shape.load(frame)
            if graphs and shape.graph is None:
                shape.capture(self._capture_stream(torch, device), session.graph_pool())
                timing.prefill_captured = True
            shape.run()
            return shape.logits

        def run():
            try:
                return attempt()
            except Exception as error:
                failed = session.prefills.get(frame.key)
                if failed is None or failed.kernels is None:
                    raise
                self.kernel_choices.give_up_prefill_fusion(error)  # the model's layers again
                session.prefills.pop(frame.key).release()
                return attempt()

        started = time.perf_counter()
        shape = session.prefills.get(frame.key)
        replay = (graphs and shape is not None and shape.graph is not None
                  and shape.vision_in_graph)
        first_logits = self.kernel_choices.static_prefill_logits(run, model, device,
                                                                 modules=not replay)
        if first_logits is None:
            session.drop_prefills()
            return None
        _synchronize(torch, device)
        timing.prefill_s = host_s + time.perf_counter() - started
        timing.prefill = 'graphed' if graphs else 'static'
        session.load_prefilled(frame.attention_mask, frame.last_positions, first_logits,
                               stop_token_ids)
        _synchronize(torch, device)
        return session

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
        choices = self.kernel_choices
        nf4 = choices.nf4_for(device)
        linears = choices.nf4_linears(model, nf4)
        session = DecodeSession(torch, model, parts, batch, cache_len, dtype, device,
                                self._kernels_for(torch, self.fuses_elementwise(graphs)), nf4,
                                linears, choices.compact_head(torch, model, parts.lm_head),
                                choices.nf4_groups(parts, nf4, linears),
                                decode_attention=not choices.attention_failed,
                                overlap_launches=choices.overlap_launches,
                                fold_elementwise=choices.folds_for(device, graphs),
                                fold_act_out=choices.fold_act_out)
        if graphs:
            choices.capture(session, self._capture_stream(torch, device),
                            lambda: self._kernels_for(torch, False))
        self._sessions[key] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)[1].release()
        return session, graphs

    def fuses_elementwise(self, graphs: bool) -> bool:
        """Whether a new session's elementwise pieces go through ``torch.compile``
        (:meth:`KernelChoices.fuses_elementwise`)."""
        return self.kernel_choices.fuses_elementwise(graphs)

    def _capture_stream(self, torch, device):
        key = str(device)
        if key not in self._capture_streams:
            self._capture_streams[key] = torch.cuda.Stream(device=device)
        return self._capture_streams[key]

    def _kernels_for(self, torch, fuse: bool) -> StepKernels:
        if fuse not in self._kernels:
            self._kernels[fuse] = StepKernels(torch, fuse)
        return self._kernels[fuse]


def _synchronize(torch, device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
