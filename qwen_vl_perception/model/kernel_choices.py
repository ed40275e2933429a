"""Which optional kernels the fast decoder uses, and what it has learnt about them.

Four pieces are optional: the fused NF4 matmul (``nf4_matmul.py``, CUDA with Triton) for
bitsandbytes 4-bit linears, ``torch.compile``'s fusion of the decode step's elementwise pieces,
the exact compact output head (``compact_head.py``) for a vocabulary whose rows are mostly
zero, and the static prefill (``static_prefill.py``: the prompt straight into the static
cache, captured in a CUDA graph per shape) instead of the model's own forward into a
``DynamicCache``. :class:`KernelChoices` is the one place that decides whether each
is used and remembers a fallback: a kernel that fails is warned about once and not tried
again. Where the NF4 kernel was asked for (``nf4_kernel=True``), a device that cannot run it
and a prefill that fails through it are errors instead; so is a failing static prefill that
was asked for (``static_prefill=True``).
"""
import contextlib
import warnings
import weakref
from typing import Dict, Optional

from .torch_support import triton_missing_reason

SHARED_INPUT_LINEARS = (('self_attn', ('q_proj', 'k_proj', 'v_proj')),
                        ('mlp', ('gate_proj', 'up_proj')))
"""A decoder layer's projections that read the same input, as (owner, names): the NF4 kernel
computes each group in one launch."""

FUSE_PREFILL_DEFAULT = True
"""``fuse_prefill=None``'s choice: on (timed on the H200, ``results/benchmark/README.md``)."""


class KernelChoices:
    """``nf4_kernel``: ``None`` means "on CUDA when Triton is there, until it fails once";
    ``fuse_elementwise``: ``None`` means "with CUDA graphs, when Triton imports";
    ``static_prefill``: ``None`` means "with CUDA graphs (captured per shape), until it fails
    once", True "always (graphed with CUDA graphs, else eager)", False "never";
    ``overlap_launches``: the NF4 and decode attention kernels start with programmatic
    dependent launch where the GPU has it (compute capability 9.0+; ``None`` means on);
    ``fold_elementwise``: decode steps fold their residual adds and RMSNorms into
    the NF4 launches where every layer allows it (``DecodeSession.folds``), until it fails
    once; ``None`` means "with CUDA graphs, where the launches overlap" (:meth:`folds_for`:
    folded and overlapped is the fastest decode step measured on the H200, folded alone is
    not, ``results/benchmark/README.md``); ``fold_act_out``: a folded step's gate+up launches
    write SiLU(gate) * up themselves (``None`` means on) rather than leave it to a kernel of
    its own; off from the first failure of a step doing so (``capture``); ``fuse_prefill``:
    the static prefill's layers run their norms, residual adds and SiLU x up through the
    session's step kernels (:meth:`prefill_kernels`; ``None``: :data:`FUSE_PREFILL_DEFAULT`),
    until that fails once."""

    def __init__(self, nf4_kernel: Optional[bool] = None,
                 fuse_elementwise: Optional[bool] = None,
                 static_prefill: Optional[bool] = None,
                 overlap_launches: Optional[bool] = None,
                 fold_elementwise: Optional[bool] = None,
                 fold_act_out: Optional[bool] = None,
                 fuse_prefill: Optional[bool] = None):
        self.nf4_kernel = nf4_kernel
        self.fuse_elementwise = fuse_elementwise
        self.static_prefill = static_prefill
        self.overlap_launches = overlap_launches is None or bool(overlap_launches)
        self.fold_elementwise = None if fold_elementwise is None else bool(fold_elementwise)
        self.fold_act_out = fold_act_out is None or bool(fold_act_out)
        self.fuse_prefill = FUSE_PREFILL_DEFAULT if fuse_prefill is None else bool(fuse_prefill)
        self.prefill_fusion_failed = False
        """True once a prefill with its layers through the step kernels failed: the static
        prefill runs the model's layers from then on."""
        self.fold_failed = False
        """True once a decode step with folded elementwise work failed: not folded again."""
        self.static_prefill_failed = False
        """True once the static prefill failed: the model's own forward from then on."""
        self.nf4_failed = False
        """True once the NF4 kernel failed: bitsandbytes' own path from then on."""
        self.fusion_failed = False
        """True once fused elementwise kernels failed to compile or capture."""
        self.attention_failed = False
        """True once the decode attention kernel failed: SDPA from then on."""
        self.nf4_matmul = None
        """The :class:`~qwen_vl_perception.model.nf4_matmul.NF4Matmul` in use, once made."""
        self._devices: Dict[str, object] = {}
        # model -> [(module, its NF4Matmul linear, the compute dtype it was made for)]
        self._linears = weakref.WeakKeyDictionary()
        self._heads = weakref.WeakKeyDictionary()  # model -> its CompactHead or None

    # -- NF4 ------------------------------------------------------------------------------

    def nf4_for(self, device):
        """The fused NF4 matmul for ``device``, or None (bitsandbytes' own path). Whether the
        kernels can run on a device is found out once."""
        if self.nf4_kernel is False or self.nf4_failed:
            return None
        key = str(device)
        if key not in self._devices:
            from .nf4_matmul import NF4Matmul, kernel_unavailable_reason
            reason = kernel_unavailable_reason(device)
            if reason is not None and self.nf4_kernel:
                raise ValueError(reason)
            if reason is None and self.nf4_matmul is None:
                self.nf4_matmul = NF4Matmul(overlap_launches=self.overlap_launches)
            self._devices[key] = None if reason else self.nf4_matmul
        return self._devices[key]

    def nf4_linears(self, model, nf4) -> dict:
        """``{module: its NF4Matmul linear}`` for ``model``'s NF4 layers, made once per model
        (again when a layer's compute dtype changed); empty without ``nf4``. Prefill and
        every decode session share them."""
        if nf4 is None:
            return {}
        cached = self._linears.get(model)
        if cached is None or any(getattr(module, 'compute_dtype', None) != dtype
                                 for module, _, dtype in cached):
            cached = []
            for module in model.modules():
                linear = nf4.linear_for(module)
                if linear is not None:
                    cached.append((module, linear, getattr(module, 'compute_dtype', None)))
            self._linears[model] = cached
        return {module: linear for module, linear, _ in cached}

    @staticmethod
    def nf4_groups(parts, nf4, linears) -> dict:
        """Each layer's (q, k, v) and (gate, up) projections -> one launch computing them,
        where ``nf4`` can group them (all in ``linears``, same input size and quantization)."""
        groups = {}
        if nf4 is None:
            return groups
        for layer in parts.layers:
            for owner, names in SHARED_INPUT_LINEARS:
                modules = tuple(getattr(getattr(layer, owner), name) for name in names)
                if all(module in linears for module in modules):
                    group = nf4.group_linear_for(modules)
                    if group is not None:
                        groups[modules] = group
        return groups

    def nf4_layer_count(self, model) -> int:
        """How many of ``model``'s layers have an NF4 replacement made (0 if none yet)."""
        return len(self._linears.get(model) or ())

    def prefill(self, prefill, model, tensors, device):
        """``prefill(model, tensors)`` with the NF4 linears through the fused kernel. If that
        fails but bitsandbytes' own path works, and the kernel was only on by default, warn
        and stay on bitsandbytes from then on."""
        if self.nf4_for(device) is None:
            return prefill(model, tensors)
        try:
            with self._lean_nf4_linears(model, device):
                return prefill(model, tensors)
        except Exception as error:
            if self.nf4_kernel:
                raise
            result = prefill(model, tensors)  # a failure here is the model's own: raised
            self._give_up_nf4('prefill through the fused NF4 kernels failed', error,
                              "using bitsandbytes' own path")
            return result

    @contextlib.contextmanager
    def _lean_nf4_linears(self, model, device):
        """While active, the model's NF4 linears run through the fused kernel. Modules that
        already have a forward of their own (hooks) are left alone."""
        swapped = []
        try:
            for module, linear in self.nf4_linears(model, self.nf4_for(device)).items():
                if 'forward' not in module.__dict__:
                    module.forward = linear
                    swapped.append(module)
            yield
        finally:
            for module in swapped:
                module.__dict__.pop('forward', None)

    def _give_up_nf4(self, what: str, error: Exception, instead: str) -> None:
        warnings.warn(f'{what} ({type(error).__name__}: {error}); {instead}', RuntimeWarning)
        self.nf4_failed = True

    # -- the static prefill ---------------------------------------------------------------

    def uses_static_prefill(self, graphs: bool) -> bool:
        """As ``static_prefill`` says, else with CUDA graphs; never after it failed once."""
        if self.static_prefill_failed or self.static_prefill is False:
            return False
        return bool(self.static_prefill) or graphs

    def static_prefill_logits(self, run, model, device, modules: bool = True):
        """``run()`` (a static prefill: it returns the first logits) with the NF4 linears
        through the fused kernel (``modules=False``: a graph replay, which runs no module).
        None after a failure, warned about once and remembered (the caller uses the model's
        own forward), unless the static prefill was asked for (then the failure is
        raised)."""
        try:
            if not modules:
                return run()
            with self._lean_nf4_linears(model, device):
                return run()
        except Exception as error:
            if self.static_prefill:
                raise
            warnings.warn(f'the static prefill failed ({type(error).__name__}: {error}); '
                          "using the model's own forward", RuntimeWarning)
            self.static_prefill_failed = True
            return None

    def prefill_kernels(self, session):
        """The step kernels a new prefill shape of ``session`` runs its layers' elementwise
        work through (``fuse_prefill``), or None (the model's layers)."""
        return session.kernels if self.fuse_prefill and not self.prefill_fusion_failed else None

    def give_up_prefill_fusion(self, error) -> None:
        """After a prefill through the step kernels failed: warned once, not tried again."""
        warnings.warn('the prefill with its layers through the step kernels failed '
                      f"({type(error).__name__}: {error}); running the model's layers",
                      RuntimeWarning)
        self.prefill_fusion_failed = True

    # -- elementwise fusion ---------------------------------------------------------------

    def fuses_elementwise(self, graphs: bool) -> bool:
        """As ``fuse_elementwise`` says, else with CUDA graphs where Triton imports; never
        after fusion failed once. Without Triton (a JetPack torch may lack it) torch.compile
        cannot build CUDA code: every new session would try, warn and fall back."""
        if self.fusion_failed:
            return False
        if self.fuse_elementwise is not None:
            return bool(self.fuse_elementwise)
        return graphs and triton_missing_reason() is None

    # -- folding ----------------------------------------------------------------------------

    def folds_for(self, device, graphs: bool = True) -> bool:
        """Whether a new session on ``device`` tries to fold its elementwise work (it still
        needs every layer to allow it): as ``fold_elementwise`` says, else with CUDA graphs
        (``graphs``: a failing folded launch is then caught at capture, and the step runs its
        elementwise work apart) where both the NF4 kernel and the decode attention kernel
        launch overlapped; never after folding failed once."""
        if self.fold_failed or self.fold_elementwise is False:
            return False
        if self.fold_elementwise:
            return True
        from .torch_support import require_torch
        if (not graphs or not self.overlap_launches
                or require_torch().device(device).type != 'cuda'
                or triton_missing_reason() is not None):
            return False
        try:
            from .decode_attention import overlap_supported
            from .nvrtc import programmatic_launch_supported
        except ImportError:  # a Triton that imports but lacks what the attention kernel needs
            return False
        return overlap_supported(device) and programmatic_launch_supported(device)

    # -- capturing a decode session -------------------------------------------------------

    def capture(self, session, stream, unfused_kernels) -> None:
        """Capture ``session``'s step in a CUDA graph, falling back on failure: without the
        decode attention kernel if the failure came from it, else first without the NF4
        kernel, then without fused elementwise kernels (``unfused_kernels()`` gives those).
        A failure of the folded step (``FoldFailed``) comes first: gate+up writing SiLU(gate)
        * up is given up first, folding at the next such failure; a compiled piece past
        dynamo's recompile limit drops the fused kernels alone.
        Each fallback is warned about and remembered; a failure with none left is raised."""
        while True:
            try:
                session.capture(stream)
                return
            except Exception as error:
                from .decode_session import FoldFailed
                if isinstance(error, FoldFailed) and getattr(session, 'act_out_folded', False):
                    warnings.warn(f'{error}; SiLU(gate) * up by a kernel of its own, the rest '
                                  'still folded', RuntimeWarning)
                    self.fold_act_out = False
                    session.without_act_out()
                elif isinstance(error, FoldFailed):
                    warnings.warn(f'{error}; launching the elementwise work apart',
                                  RuntimeWarning)
                    self.fold_failed = True
                    session.without_folds()
                elif session.kernels.fused and _recompile_limit(error):
                    warnings.warn('a fused decode kernel reached torch.compile\'s recompile '
                                  f'limit ({type(error).__name__}: {error}); falling back to '
                                  'unfused ones', RuntimeWarning)
                    self.fusion_failed = True
                    session.kernels = unfused_kernels()
                elif session.attention is not None and _raised_in(error, 'decode_attention'):
                    warnings.warn('the decode attention kernel failed '
                                  f'({type(error).__name__}: {error}); using '
                                  'scaled_dot_product_attention', RuntimeWarning)
                    self.attention_failed = True
                    session.without_decode_attention()
                elif session.nf4_matmul is not None:
                    self._give_up_nf4('capturing the decode step failed', error,
                                      'trying again without the fused NF4 kernel')
                    session.without_nf4()
                elif session.kernels.fused:
                    warnings.warn('fused decode kernels failed to compile or capture '
                                  f'({type(error).__name__}: {error}); falling back to '
                                  'unfused ones', RuntimeWarning)
                    self.fusion_failed = True
                    session.kernels = unfused_kernels()
                else:
                    raise

    # -- the output head -----------------------------------------------------------------

    def compact_head(self, torch, model, lm_head):
        """``model``'s :class:`~qwen_vl_perception.model.compact_head.CompactHead`, or None
        when its head is not mostly zero rows; found out once per model."""
        if model not in self._heads:
            from .compact_head import CompactHead
            self._heads[model] = CompactHead.for_head(torch, lm_head)
        return self._heads[model]

    def forget_models(self) -> None:
        """Drop what was learnt about models' layers (after a model changed in place)."""
        self._linears = weakref.WeakKeyDictionary()
        self._heads = weakref.WeakKeyDictionary()


def _recompile_limit(error: Exception) -> bool:
    """Whether ``error`` is dynamo's recompile limit being reached (there or in its causes)."""
    while error is not None:
        if type(error).__name__ in ('FailOnRecompileLimitHit', 'RecompileLimitExceeded',
                                    'FailOnCacheLimitHit', 'CacheLimitExceeded'):
            return True
        error = error.__cause__ or error.__context__
    return False


def _raised_in(error: Exception, module: str) -> bool:
    """Whether ``error`` was raised inside this package's ``module`` (its traceback)."""
    frame = error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_globals.get('__name__', '').endswith('.' + module):
            return True
        frame = frame.tb_next
    return False
