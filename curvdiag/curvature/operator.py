"""The curvature operator: loss, gradient and Hessian-vector products of the mean loss.

L(θ) = Σ_b n_b L_b(θ) / Σ_b n_b over the batches b (n_b samples each: a sample-weighted mean,
never an equal-weight mean of batch means), G = ∇L, and Hv = ∇(Gᵀv) for a flat vector v of
``num_params`` entries (the trainable parameters of ``model.named_parameters()`` concatenated
in order; weight-tied tensors once). Every probe works on this object, so this is the one
place where contributions of batches and ranks are summed.

Probes that need more than products (the Gauss–Newton matrix, HesScale) evaluate each batch
through the public per-batch interface and sum through the operator, never around it:
:meth:`for_each_batch` yields (w_b, batch) inside :meth:`probing`, :meth:`batch_loss` is the
batch's scalar loss, :meth:`parameter_gradients` differentiates w.r.t. θ, :meth:`sum_over_ranks`
is the one collective, and :meth:`covered_on_every_rank` makes a refusal found on one rank's
batches (:class:`~curvdiag.errors.NotCovered`) every rank's refusal. Σ_ranks Σ_b w_b f_b of a
per-batch quantity f_b is then the single-process sum over all batches, to rounding.

How Hv is computed (``hvp_method``), chosen by measurement (DESIGN §3):
- ``kept-graph``: the gradient graph of every batch is built once (``create_graph=True``) and
  each product is one backward through it: 1.55× a gradient on CPU, 2.0–2.4× on an H100.
  Holds the activations of all batches, so ``auto`` uses it when they fit in ``memory`` bytes:
  the graph's saved tensors of this rank's first batch (distinct storages, parameters excluded,
  measured with ``saved_tensors_hooks`` on a forward-and-backward pass with ``create_graph=True``)
  times the rank's samples over that batch's samples; when it fits, that first batch's graph is
  the kept graph's (no second pass). Under several ranks each rank keeps what fits on it, and the
  ranks agree on the method's label and price (one collective).
- ``double-backward``: per batch, a fresh gradient graph and one backward; memory of one batch.
- ``partial-kept-graph`` (``auto``'s choice): when the whole graph does not fit but some batches'
  graphs do, the graphs of the first k batches whose estimated bytes fit in ``memory`` are kept
  (one backward through their sum) and the other batches are double-backward: a product costs
  f·1.5 + (1 − f)·3.0 gradient-equivalents with f the kept share of the samples, instead of 3.0.
  Asked for by name (what :meth:`CurvatureOperator.build_options` hands back, for an operator
  built again at other weights) k is measured again, and all or none may fit then, but the
  start-up check is not made again: the first build made it.
- ``finite-difference``: (G(θ + h v̂) − G(θ − h v̂)) / 2h · ‖v‖ with unit v̂, for kernels that
  have no double backward (fused attention) when the exact ``math`` attention kernel fails too.
With ``auto`` the first product is checked at start-up: a missing double backward in a fused
attention kernel retries with PyTorch's math attention backend (``fallback="math-attention"``),
then finite differences (``fallback="finite-difference"``). An explicit ``kept-graph`` or
``double-backward`` makes no check; its first product that finds no double backward switches to
math attention the same way (one process) and is made again. The check multiplies the unit vector
Lanczos starts from at seed 0; its product is kept until the first product, which reuses it when
it asks the same vector at unchanged weights (``check_reused``): λmax pays nothing for the check.

Under several processes (``distributed=True``, DESIGN §2.5) each rank holds its shard of the
batches; the weights are n_b / N with N the sample count over all ranks, and the loss with the
gradient, each product and each ``gradient_at`` are summed over the ranks in one collective
(``all_reduce``) each: every rank then holds the global numbers and takes the same decisions. At
start-up one ``all_gather`` shares the ranks' batch and sample counts and checks that every rank
built the same model with the same weights. In one process nothing is communicated.

Probing never changes the model: eval mode by default (``train_mode=True`` uses batch statistics
while keeping dropout off), buffers such as BatchNorm running statistics are restored after
every forward pass, ``.grad`` fields are never written, and the modules' modes are restored.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from curvdiag.curvature.linear_operator import norm, random_vector
from curvdiag.errors import BadArgument, BadInput, NotCovered
from curvdiag.model_state import preserved_state

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]

HVP_METHODS = ("auto", "kept-graph", "double-backward", "finite-difference")
#: What one Hessian-vector product costs in gradient-equivalents (GE: one forward and backward over
#: all the data), by how it is taken. Measured on CPU (DESIGN §3, issue #16): with the gradient graph
#: kept, an HVP took 1.5–1.7× a gradient up to 2M parameters; double backward per batch 3.07× at 64
#: batches; finite differences are two gradients. Prices are fixed, not timed, so that a budget stops
#: every run of the same settings at the same product (the report gives the seconds beside them).
HVP_PRICE = {"kept-graph": 1.5, "double-backward": 3.0, "finite-difference": 2.0}
#: ``auto``'s choice when only some batches' graphs fit the memory budget (not a method to ask for).
PARTIAL = "partial-kept-graph"
_KEEPS = ("kept-graph", PARTIAL)  # methods whose set-up keeps gradient graphs
_NO_DOUBLE_BACKWARD = ("not implemented", "double backward", "once_differentiable", "differentiate twice")


@dataclass
class FiniteDifferenceInfo:
    step: float
    relative_error_estimate: Optional[float] = None


def math_attention() -> contextlib.AbstractContextManager:
    """PyTorch's math attention backend for ``scaled_dot_product_attention`` inside the context
    (exact, and differentiable twice where the fused kernels are not); a no-op on a torch without
    backend selection."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except Exception:  # older torch: no backend selection available
        return contextlib.nullcontext()


ONCE_DIFFERENTIABLE = ("a backward in the model is marked once_differentiable: no double backward (its second "
                        "derivative would be silently zero)")


def once_differentiable_in(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the autograd graph behind ``tensors`` holds the node torch puts after a function marked
    ``@once_differentiable`` (``Error``): differentiating through it again raises nothing and adds
    nothing, so a product would silently miss that function's second derivative. A walk of the
    graph's nodes (~1 µs each)."""
    error = getattr(torch._C._functions, "Error", None)
    seen, stack = set(), [t.grad_fn for t in tensors if t is not None and t.grad_fn is not None]
    while error is not None and stack:
        node = stack.pop()
        if node in seen:
            continue
        if isinstance(node, error):
            return True
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return False


def _lacks_double_backward(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, NotImplementedError)) and any(t in text for t in _NO_DOUBLE_BACKWARD)


class CurvatureOperator:
    """Loss, gradient and HVP of a model's sample-weighted mean loss over a list of batches.

    Args:
        model: the module; its trainable parameters define θ (n entries).
        batches: the batches, already on the model's device.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar mean loss of one batch.
        batch_sizes: samples per batch (n_b); all equal to 1 when omitted (equal weights).
        train_mode: evaluate with batch statistics (dropout stays off); default eval mode.
        hvp_method: one of ``HVP_METHODS``, or ``partial-kept-graph`` as :meth:`build_options` hands it back.
        memory: bytes the kept gradient graphs may take: past it ``auto`` keeps the graphs of as many
            leading batches as fit (``partial-kept-graph``), or of none (``double-backward``) when
            not even the first fits; default a quarter of the device's available memory
            (:func:`default_memory`).
        fd_step: h for finite differences along a unit vector.
        distributed: sum over the ranks of the initialised process group (``batches`` is this
            rank's shard; see :mod:`curvdiag.curvature.distributed`). Every rank must construct the operator
            and call the same products in the same order.
        attention: "auto" (the fused kernel, and math attention only when a product finds it lacks
            double backward) or "math" (math attention from the start, ``fallback="math-attention"``:
            an operator built again for a model already found to need it skips the failed try).
        first_batch_graph: (L_1, ∇L_1 with ``create_graph``) of the first batch at these weights,
            built by the caller (a training step's own backward), which ``kept-graph`` takes over
            instead of building it again. Only where that forward is the operator's: the same mode,
            no dropout drawn (a training step's graph under dropout is another Hessian).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batches: Sequence[Any],
        loss_fn: LossFn,
        batch_sizes: Optional[Sequence[int]] = None,
        *,
        train_mode: bool = False,
        hvp_method: str = "auto",
        memory: Optional[int] = None,
        fd_step: float = 3e-3,
        distributed: bool = False,
        attention: str = "auto",
        first_batch_graph: Optional[Tuple[float, Sequence[Optional[torch.Tensor]]]] = None,
    ):
        if hvp_method not in HVP_METHODS and hvp_method != PARTIAL:
            raise BadArgument("hvp_method", hvp_method, "unknown", hint=f"choose one of {', '.join(HVP_METHODS)}")
        if attention not in ("auto", "math"):
            raise BadArgument("attention", attention, "unknown", hint="choose auto or math")
        check_memory(memory)
        from curvdiag.curvature import distributed as dist

        self.distributed = bool(distributed) and dist.is_distributed()
        dist.check_supported(model)
        self.model = model
        self.batches = list(batches)
        if not self.batches and not self.distributed:  # a rank may have no share: checked below
            raise BadInput("no batches to probe", hint="the recipe's data() returned nothing")
        self.loss_fn = loss_fn
        sizes = list(batch_sizes) if batch_sizes is not None else [1] * len(self.batches)
        if len(sizes) != len(self.batches):
            raise BadArgument("batch_sizes", sizes, f"must have one entry per batch ({len(self.batches)})")
        self.batch_sizes = sizes
        self.rank, self.world_size = (dist.rank(), dist.world_size()) if self.distributed else (0, 1)
        self.num_batches = len(self.batches)  # over all ranks (set below when distributed)
        self.num_samples = int(sum(sizes))  # over all ranks: N of the weights n_b / N
        self.train_mode = train_mode
        self.fd_step = fd_step
        self._graph_checked = False  # the first create_graph gradient's graph walked for once_differentiable
        self._lay_out_parameters(model)
        if self.distributed:
            self._agree_on_start()
        self.weights = [s / self.num_samples for s in sizes]
        self.hvp_count = 0
        self.on_hvp: Optional[Callable[[int], None]] = None  # called with hvp_count after each product
        self.spent = 0.0  # GE priced over every product since set-up (HVP_PRICE, gradients 1, charge())
        self.spend_limit: Optional[float] = None  # GE: where budget_left() reaches 0; None: unbounded
        self.gradient_seconds = math.nan  # measured: the set-up's loss and gradient over all the data
        self.fallback: Optional[str] = None
        self.fallback_reason: Optional[str] = None
        self.finite_difference: Optional[FiniteDifferenceInfo] = None
        self._attention_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        if attention == "math":
            self._attention_context, self.fallback = math_attention, "math-attention"
        self._kept_gradient: Optional[List[torch.Tensor]] = None
        # The start-up check's product, (vector, this rank's product, parameter versions), until the
        # first product: when that asks for the same vector at the same weights it is not made again.
        self._check_product: Optional[Tuple[torch.Tensor, torch.Tensor, int]] = None
        self._check_start: Optional[torch.Tensor] = None  # the check's vector before normalising (seed 0)
        self.check_reused = False  # the first product was the start-up check's (no product made for it)
        # The memory estimate's first-batch graph (loss, create_graph gradient, seconds), which the
        # kept graph's build takes over instead of making it again (_local_prepare drops it otherwise).
        self._estimated_first: Optional[Tuple[float, List[torch.Tensor], float]] = None
        if first_batch_graph is not None:
            if hvp_method != "kept-graph" or not self.batches or self.weights[0] != 1.0:
                raise BadArgument("first_batch_graph", "given", "needs hvp_method='kept-graph' and a first batch of weight 1")
            loss_value, grads = first_batch_graph
            self._estimated_first = (float(loss_value), self._zeros_for_unused(grads), 0.0)
        self._graph_stale = False
        self.memory: Optional[int] = None  # bytes the kept graph may take (auto only)
        self.graph_bytes: Optional[int] = None  # estimated bytes of this rank's kept graph (auto only)
        self._graph_bytes_per_sample = 0.0
        # This rank's leading batches whose graphs are kept, and the share of all ranks' samples they hold.
        self.kept_batches = len(self.batches) if hvp_method == "kept-graph" else 0
        self.kept_fraction = 1.0 if hvp_method == "kept-graph" else 0.0
        self._kept_over_ranks = (self.kept_batches, 0)  # auto: (batches kept, graph bytes) summed over the ranks
        if hvp_method in ("auto", PARTIAL):
            self.memory = default_memory(self.device) if memory is None else memory
            self._measure_graph()
            if hvp_method == "auto":
                self._prepare_with_fallback()  # its _local_prepare takes the estimate's graph over
            else:  # built again as an auto operator ended up: its check was made
                self._prepare()
        else:
            self.hvp_method = hvp_method
            self._prepare()

    # ------------------------------------------------------------------ set-up
    def _lay_out_parameters(self, model: torch.nn.Module) -> None:
        """θ: the trainable parameters in ``named_parameters()`` order (tied tensors once), flat."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise BadInput("the model has no trainable parameters", hint="does model() freeze everything?")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.num_params = sum(self.numels)
        self.size = self.num_params  # the linear-operator interface of curvdiag.curvature.linear_operator
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype

    def _estimate_graph_bytes(self) -> int:
        """Bytes this rank's kept gradient graph would hold: the saved tensors of the first batch's
        loss and ``create_graph`` gradient × Σ_b n_b / n_1. A saved tensor counts the bytes it spans
        in its storage, each byte once (:func:`_spanned_bytes`): a batch sliced from one data tensor
        counts its own rows, not the whole data set, which the graph does not add (counted whole,
        128-row batches of a 1,797-row tensor came out 14× too large). The parameters' own storages
        are excluded, as they are held anyway. Costs one batch's forward and backward; 0 without
        batches. A kernel without double backward counts 0: the product check then falls back.
        The first batch's graph is kept (weighted as the build weights it) for the build to take over."""
        if not self.batches:
            return 0
        owned = {p.untyped_storage().data_ptr() for p in self.params}
        spans: Dict[int, List[Tuple[int, int]]] = {}
        loose = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal loose
            try:
                key, span = tensor.untyped_storage().data_ptr(), _byte_span(tensor)
            except Exception:  # no plain storage (a tensor subclass): count its elements
                loose += tensor.element_size() * tensor.numel()
                return tensor
            if key not in owned:
                spans.setdefault(key, []).append(span)
            return tensor

        started, weight = time.perf_counter(), self.weights[0]
        try:
            with self.probing(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = _depending_on_parameters(self.batch_loss(self.batches[0]))
                graph = self.parameter_gradients(loss * weight if weight != 1.0 else loss, create_graph=True)
            self._estimated_first = (float(loss.detach()), graph, time.perf_counter() - started)
        except Exception as exc:
            if not _lacks_double_backward(exc):
                raise
            return 0
        total = loose + sum(_spanned_bytes(intervals) for intervals in spans.values())
        self._graph_bytes_per_sample = total / max(self.batch_sizes[0], 1)
        return int(math.ceil(self._graph_bytes_per_sample * sum(self.batch_sizes)))

    def _measure_graph(self) -> None:
        """``auto``: estimate the graph in the attention kernel that runs and choose the batches to
        keep. Measured again after a switch to math attention, which keeps the T × T attention
        weights of every head that the fused kernel recomputes (at long sequences many times the
        fused graph); every rank switches together, so the choice's collective stays in step.
        A first-batch graph that is not kept is freed before the check draws its vector."""
        self._estimated_first = None
        self.graph_bytes = self._estimate_graph_bytes()
        self._choose_kept_batches()
        if self.kept_batches == 0:
            self._estimated_first = None

    def _choose_kept_batches(self) -> None:
        """``auto``'s method from the estimate: the graphs of this rank's leading batches are kept
        while their bytes (the first batch's per sample × the samples so far) fit in ``memory``:
        all of them on every rank → ``kept-graph``; none on any → ``double-backward``; else
        ``partial-kept-graph``. Ranks keep what fits on each and agree on the label and the kept
        share of the samples (one collective), so that every rank prices a product alike."""
        kept, samples = 0, 0
        for size in self.batch_sizes:
            if math.ceil(self._graph_bytes_per_sample * (samples + size)) > self.memory:
                break
            kept, samples = kept + 1, samples + size
        self.kept_batches = kept
        short, kept_samples = float(kept < len(self.batches)), float(samples)
        self._kept_over_ranks = (kept, self.graph_bytes or 0)
        if self.distributed:
            short, kept_samples, kept_all, bytes_all = self.sum_over_ranks(torch.tensor(
                [short, kept_samples, float(kept), float(self.graph_bytes or 0)], dtype=torch.float64,
                device=self.device)).tolist()
            self._kept_over_ranks = (int(kept_all), int(bytes_all))
        self.kept_fraction = kept_samples / max(self.num_samples, 1)
        if short == 0.0:
            self.hvp_method, self.kept_fraction = "kept-graph", 1.0
        elif kept_samples == 0.0:
            self.hvp_method = "double-backward"
        else:
            self.hvp_method = PARTIAL

    def _agree_on_start(self) -> None:
        """One all_gather of (parameters, weight fingerprint, batches, samples) per rank: global
        counts, and the same BadInput on every rank when the ranks' models differ."""
        from curvdiag.curvature import distributed as dist

        table = dist.agree_on_model(self.model, [len(self.batches), sum(self.batch_sizes)])
        self.num_batches = int(sum(entry[2] for entry in table))
        self.num_samples = int(sum(entry[3] for entry in table))
        if self.num_batches == 0:
            raise BadInput("no batches to probe on any rank", hint="the recipe's data() returned nothing")

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """Σ over the ranks of each rank's ``tensor`` (one collective), in place, and returned; the
        tensor itself in one process. Every rank must call it with the same shape, in the same order."""
        if self.distributed:
            from curvdiag.curvature.distributed import all_reduce_sum

            all_reduce_sum(tensor)
        return tensor

    @contextlib.contextmanager
    def covered_on_every_rank(self) -> Iterator[None]:
        """A block whose checks look at this rank's batches and may raise :class:`NotCovered` on
        some ranks only: afterwards every rank raises the lowest refusing rank's NotCovered, or
        none does (one collective; one more on a refusal), so all ranks take the same branch."""
        refusal: Optional[NotCovered] = None
        try:
            yield
        except NotCovered as exc:
            refusal = exc
        if self.distributed:
            from curvdiag.curvature import distributed as dist

            first = dist.first_rank_where(refusal is not None, self.device)
            if first is not None:
                raise NotCovered(dist.broadcast_text(None if refusal is None else refusal.reason, first))
        if refusal is not None:
            raise refusal

    def _reduce_loss_and_gradient(self, loss: float, gradient: torch.Tensor) -> Tuple[float, torch.Tensor]:
        """(Σ_ranks loss, Σ_ranks gradient) in one collective on [gradient, loss] (the loss travels
        in the parameters' dtype: float32 rounding, 1e-7 relative, for a float32 model)."""
        if not self.distributed:
            return loss, gradient
        buffer = self.sum_over_ranks(torch.cat([gradient, gradient.new_tensor([loss])]))
        return float(buffer[-1]), buffer[:-1]

    def _prepare(self) -> None:
        self._finish_prepare(*self._local_prepare())

    def _local_prepare(self) -> Tuple[float, torch.Tensor]:
        """This rank's loss and gradient (not yet summed over ranks), keeping the graph if asked;
        its wall time is what one gradient-equivalent takes here."""
        started = time.perf_counter()
        # A first batch taken over from the memory estimate counts with the seconds it took there.
        taken_over = self._estimated_first[2] if self._estimated_first is not None and self.hvp_method in _KEEPS else 0.0
        try:
            if self.hvp_method in _KEEPS:
                return self._build_kept_graph()
            self._kept_gradient = None
            self._estimated_first = None
            return self._local_loss_and_gradient()
        finally:
            self.gradient_seconds = time.perf_counter() - started + taken_over

    def _finish_prepare(self, loss: float, gradient: torch.Tensor) -> None:
        self._loss, self._gradient = self._reduce_loss_and_gradient(loss, gradient)
        if not math.isfinite(self._loss):
            raise BadInput(f"the loss is not finite ({self._loss}) at these weights",
                           hint="the run had already diverged here; probe an earlier checkpoint")
        if self.hvp_method == "finite-difference":
            self._estimate_finite_difference_error()

    def _try_exact(self, probe: torch.Tensor) -> Tuple[Optional[Tuple[float, torch.Tensor]], Optional[BaseException]]:
        """Local set-up and one local product: (local loss and gradient, None), or (None, error)
        when a kernel has no double backward. Under several ranks all of them agree on the outcome
        (one collective), so every rank takes the same branch and issues the same collectives."""
        local, failure = None, None
        try:
            local = self._local_prepare()
            self._check_product = (probe, self._local_hvp(probe), self._parameter_versions())
        except Exception as exc:
            if not _lacks_double_backward(exc):
                raise
            local, failure = None, exc
        if self.distributed:
            flag = self.sum_over_ranks(torch.tensor([0.0 if failure is None else 1.0], device=self.device))
            if float(flag[0]) > 0 and failure is None:
                local, failure = None, RuntimeError("another rank: a kernel has no double backward")
        return local, failure

    def _prepare_with_fallback(self) -> None:
        """Build, then check one product; on a missing double backward fall back (DESIGN §3). The
        check multiplies the unit vector Lanczos starts from at seed 0 (``lambda_max``'s default),
        so that λmax's first product is the check's, kept rather than made twice."""
        start = random_vector(self.num_params, 0, self.device, self.dtype)
        probe = start / norm(start)  # as lanczos normalises its start: the same bits
        self._check_start = start
        local, failure = self._try_exact(probe)
        if failure is None:
            self._finish_prepare(*local)
            return
        self.fallback_reason = str(failure).strip().splitlines()[0][:200]
        self._kept_gradient = None
        self._attention_context = math_attention
        if self.memory is not None:  # auto: math attention's graph keeps T² weights per head that the fused one does not
            self._measure_graph()
        local, failure = self._try_exact(probe)
        if failure is None:
            self.fallback = "math-attention"
            self._finish_prepare(*local)
            return
        self._attention_context = contextlib.nullcontext
        self._check_product = self._check_start = None
        self.kept_batches, self.kept_fraction = 0, 0.0
        self.hvp_method = "finite-difference"
        self.fallback = "finite-difference"
        self._prepare()

    # ------------------------------------------------------------------ per batch
    @contextlib.contextmanager
    def probing(self) -> Iterator[None]:
        """The probing mode (eval, or train mode with dropout off; the attention kernel chosen at
        start-up); afterwards every buffer and every module's mode is restored."""
        with preserved_state(self.model, self.train_mode), self._attention_context():
            yield

    def for_each_batch(self) -> Iterator[Tuple[float, Any]]:
        """(w_b, batch) for each of this rank's batches, each yielded inside :meth:`probing`;
        w_b = n_b / N with N the sample count over all ranks."""
        return self._batches_from(0)

    def _batches_from(self, start: int, stop: Optional[int] = None) -> Iterator[Tuple[float, Any]]:
        """(w_b, batch) for this rank's batches ``start`` ≤ b < ``stop``, each inside :meth:`probing`."""
        for weight, batch in zip(self.weights[start:stop], self.batches[start:stop]):
            with self.probing():
                yield weight, batch

    def batch_loss(self, batch: Any) -> torch.Tensor:
        """The scalar mean loss of one batch, shape (), in the graph (call inside :meth:`probing`)."""
        return self.loss_fn(self.model, batch).reshape(())

    @property
    def keeps_graph(self) -> bool:
        """Whether products go back through kept gradient graphs of all batches (their memory is
        affordable: a probe may keep per-batch graphs of its own too)."""
        return self.hvp_method == "kept-graph"

    def parameter_gradients(self, outputs: Any, grad_outputs: Any = None, **kw: Any) -> List[torch.Tensor]:
        """torch.autograd.grad of ``outputs`` w.r.t. θ, one tensor per parameter, zeros for unused
        ones; outputs that do not depend on θ (a constant gradient: a zero Hessian block) add nothing."""
        if isinstance(outputs, torch.Tensor):
            outputs, grad_outputs = [outputs], None if grad_outputs is None else [grad_outputs]
        keep = [i for i, o in enumerate(outputs) if o.requires_grad]
        grads: Sequence[Optional[torch.Tensor]] = [None] * len(self.params)
        if keep:
            try:
                grads = torch.autograd.grad(
                    [outputs[i] for i in keep], self.params, allow_unused=True,
                    grad_outputs=None if grad_outputs is None else [grad_outputs[i] for i in keep], **kw)
            except RuntimeError:
                raise  # torch's own (a kernel without double backward): the fallback decides
            except Exception as exc:  # raised by the user's code: a custom autograd Function's backward
                lines = str(exc).strip().splitlines()
                raise BadInput(f"the loss's backward raised {type(exc).__name__}: {lines[0] if lines else ''}",
                               hint="a custom autograd.Function in the model or loss fails; use --debug for the traceback") from exc
        if kw.get("create_graph") and not self._graph_checked:
            if once_differentiable_in(grads):  # not marked checked: a fallback's graph is walked again
                raise RuntimeError(ONCE_DIFFERENTIABLE)
            self._graph_checked = True
        return self._zeros_for_unused(grads)

    def _zeros_for_unused(self, grads: Sequence[Optional[torch.Tensor]]) -> List[torch.Tensor]:
        """One tensor per parameter: zeros where ``torch.autograd.grad`` gave None (an unused one)."""
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]

    def _build_kept_graph(self) -> Tuple[float, torch.Tensor]:
        """Keep the gradient graphs of this rank's first :attr:`kept_batches` batches (all of them
        for ``kept-graph``); return this rank's (loss, flat gradient) over all its batches, not
        summed over ranks (the batches past the kept ones by plain gradients)."""
        loss, gradient = self._keep_graphs()
        if self.kept_batches == len(self.batches):
            return loss, gradient
        rest_loss, rest_gradient = self._local_loss_and_gradient(start=self.kept_batches)
        return loss + rest_loss, gradient + rest_gradient

    def _keep_graphs(self) -> Tuple[float, torch.Tensor]:
        """Keep the gradient graph of this rank's first :attr:`kept_batches` batches, summed into
        one; return their (Σ_b w_b L_b, flat Σ_b w_b ∇L_b)."""
        total_loss = 0.0
        gradient: Optional[List[torch.Tensor]] = None
        first, self._estimated_first = self._estimated_first, None
        for index, (weight, batch) in enumerate(self._batches_from(0, self.kept_batches)):
            if index == 0 and first is not None:  # the memory estimate built this batch's graph already
                loss_value, grads, _ = first
                total_loss += weight * loss_value
                gradient = grads
                continue
            loss = _depending_on_parameters(self.batch_loss(batch))
            # Weight the scalar loss, not the gradient tensors: no extra node per parameter in
            # the graph that every product goes back through.
            grads = self.parameter_gradients(loss * weight if weight != 1.0 else loss, create_graph=True)
            total_loss += weight * float(loss.detach())
            # Weighted sum of per-batch gradients: one graph, one backward per product.
            gradient = grads if gradient is None else [a + b for a, b in zip(gradient, grads)]
        if gradient is None:  # a rank without batches (or none kept) contributes nothing
            gradient = [torch.zeros_like(p) for p in self.params]
        self._kept_gradient = gradient
        return total_loss, self.flatten([g.detach() for g in gradient])

    def _local_loss_and_gradient(self, start: int = 0) -> Tuple[float, torch.Tensor]:
        """This rank's Σ_b w_b L_b and Σ_b w_b ∇L_b over its batches from ``start`` on (not yet
        summed over ranks)."""
        total_loss = 0.0
        total = torch.zeros(self.num_params, device=self.device, dtype=self.dtype)
        for weight, batch in self._batches_from(start):
            loss = _depending_on_parameters(self.batch_loss(batch))
            total.add_(self.flatten(self.parameter_gradients(loss)), alpha=weight)
            total_loss += weight * float(loss.detach())
        return total_loss, total

    def _estimate_finite_difference_error(self) -> None:
        """Richardson-style estimate: relative change of the product when h doubles."""
        generator = torch.Generator(device="cpu").manual_seed(12345)
        v = torch.randn(self.num_params, generator=generator, dtype=torch.float64).to(self.device, self.dtype)
        at_h = self._finite_difference_hvp(v, self.fd_step)
        at_2h = self._finite_difference_hvp(v, 2 * self.fd_step)
        self.finite_difference = FiniteDifferenceInfo(
            step=self.fd_step,
            relative_error_estimate=float((at_2h - at_h).norm() / at_h.norm().clamp_min(1e-30)),
        )

    # ------------------------------------------------------------------ vectors
    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors into one flat vector of ``num_params`` entries."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vector: torch.Tensor) -> List[torch.Tensor]:
        """Split a flat vector into views shaped like the parameters."""
        return [chunk.view(shape) for chunk, shape in zip(torch.split(vector, self.numels), self.shapes)]

    def layer_slices(self) -> List[tuple]:
        """(name, start, stop) of each parameter tensor within the flat vector."""
        out, start = [], 0
        for name, n in zip(self.names, self.numels):
            out.append((name, start, start + n))
            start += n
        return out

    def parameters_vector(self) -> torch.Tensor:
        return self.flatten([p.detach() for p in self.params])

    # ------------------------------------------------------------------ loss and gradient
    def loss(self) -> float:
        """L(θ): the sample-weighted mean loss over the batches."""
        return self._loss

    def gradient(self) -> torch.Tensor:
        """G = ∇L(θ), flat, shape (num_params,)."""
        return self._gradient

    # ------------------------------------------------------------------ cost
    @property
    def hvp_price(self) -> float:
        """GE one :meth:`hvp` is priced at, for the method that runs (a partly kept graph: its
        kept share of the samples at the kept-graph price, the rest at double backward's)."""
        if self.hvp_method == PARTIAL:
            f = self.kept_fraction
            return f * HVP_PRICE["kept-graph"] + (1.0 - f) * HVP_PRICE["double-backward"]
        return HVP_PRICE[self.hvp_method]

    def charge(self, ge: float) -> None:
        """Add the price of a pass run outside :meth:`hvp` and :meth:`gradient_at` (a probe's own
        backward passes) to :attr:`spent`."""
        self.spent += float(ge)

    def budget_left(self) -> float:
        """GE left before :attr:`spend_limit` (+inf without one). Priced, not timed: every rank
        agrees on it, so a loop that stops on it issues the same collectives everywhere."""
        return math.inf if self.spend_limit is None else self.spend_limit - self.spent

    def can_afford(self, ge: float) -> bool:
        """Whether a further ``ge`` GE fits in what is left (a 1e-9 allowance for rounding)."""
        return ge <= self.budget_left() + 1e-9

    # ------------------------------------------------------------------ products
    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector v of shape (num_params,); returns shape (num_params,)."""
        if v.shape != (self.num_params,):
            raise ValueError(f"expected a vector of shape ({self.num_params},), got {tuple(v.shape)}")
        v = v.to(device=self.device, dtype=self.dtype)
        self.hvp_count += 1
        self.spent += self.hvp_price
        checked, self._check_product, self._check_start = self._check_product, None, None
        if checked is not None and checked[2] == self._parameter_versions() and torch.equal(v, checked[0]):
            product = self.sum_over_ranks(checked[1])  # every rank asks the same vector: the same collective
            self.check_reused = True
        elif self.hvp_method == "finite-difference":
            product = self._finite_difference_hvp(v, self.fd_step)
        else:
            product = self._exact_hvp(v)
        if self.on_hvp is not None:
            self.on_hvp(self.hvp_count)
        return product

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`hvp`, so the operator is a linear operator for the probes."""
        return self.hvp(v)

    @property
    def product_error(self) -> float:
        """A product's relative error beyond rounding: 0 for an exact product; under finite
        differences their estimated error (∞ before it is estimated)."""
        if self.hvp_method != "finite-difference":
            return 0.0
        estimate = self.finite_difference.relative_error_estimate if self.finite_difference else None
        return math.inf if estimate is None else float(estimate)

    def _exact_hvp(self, v: torch.Tensor) -> torch.Tensor:
        try:
            local = self._local_hvp(v)
        except Exception as exc:
            if not (_lacks_double_backward(exc) and self._attention_may_switch()):
                raise
            local = self._retry_in_math_attention(v, exc)
        return self.sum_over_ranks(local)

    def _attention_may_switch(self) -> bool:
        """Whether a product that found no double backward may retry in math attention: an explicit
        exact method (``auto`` checked it at start-up) on the fused kernel, in one process (ranks
        would have to agree, as the start-up check does)."""
        return self.fallback is None and self._attention_context is contextlib.nullcontext and self.world_size == 1

    def _retry_in_math_attention(self, v: torch.Tensor, failure: BaseException) -> torch.Tensor:
        """This rank's product again in math attention, the loss and gradient (and the kept graph)
        rebuilt in it, so that every later product and ``gradient_at`` use one kernel; charged one
        GE for the rebuild. When the retry fails too the missing derivative was not attention's:
        the operator is left as it was and the first error raised."""
        kept, loss, gradient = self._kept_gradient, self._loss, self._gradient
        self._attention_context = math_attention
        try:
            if self.hvp_method in _KEEPS:
                self._kept_gradient = None
                built = self._build_kept_graph()
            else:
                built = self._local_loss_and_gradient()
            product = self._local_hvp(v)
        except Exception as exc:
            if not _lacks_double_backward(exc):
                raise
            self._attention_context, self._kept_gradient = contextlib.nullcontext, kept
            self._loss, self._gradient = loss, gradient
            raise failure from None
        self._loss, self._gradient = self._reduce_loss_and_gradient(*built)
        self.fallback, self.fallback_reason = "math-attention", str(failure).strip().splitlines()[0][:200]
        self.charge(1.0)
        return product

    def _local_hvp(self, v: torch.Tensor) -> torch.Tensor:
        """This rank's share of H v: one backward through the kept graph of its first
        :attr:`kept_batches` batches, then a fresh double backward for each batch after them."""
        pieces = self.unflatten(v)
        if self._graph_stale:
            self._graph_stale = False
            self._keep_graphs()
        if self._kept_gradient is not None:
            total = self.flatten(self.parameter_gradients(self._kept_gradient, pieces, retain_graph=True))
        else:  # nothing kept (double backward): kept_batches is 0
            total = torch.zeros(self.num_params, device=self.device, dtype=self.dtype)
        for weight, batch in self._batches_from(self.kept_batches):
            grads = self.parameter_gradients(self.batch_loss(batch), create_graph=True)
            total.add_(self.flatten(self.parameter_gradients(grads, pieces)), alpha=weight)
        return total

    def gradient_at(self, theta: torch.Tensor) -> Tuple[float, torch.Tensor]:
        """(L(θ'), G(θ')) at other parameters θ' (flat, shape (num_params,)), on the same batches
        and in the same mode; the model's parameters are restored exactly afterwards. Priced 1 GE."""
        self.spent += 1.0
        return self._reduce_loss_and_gradient(*self._local_gradient_at(theta))

    def _local_gradient_at(self, theta: torch.Tensor) -> Tuple[float, torch.Tensor]:
        if theta.shape != (self.num_params,):
            raise ValueError(f"expected a vector of shape ({self.num_params},), got {tuple(theta.shape)}")
        # Swap each parameter's tensor (``.data``) rather than writing into it: the caller's values are
        # never touched and the version counters never move, so a graph the caller (or the kept
        # gradient graph) built before stays usable after the parameters are put back.
        originals = [p.data for p in self.params]
        try:
            for p, value in zip(self.params, self.unflatten(theta.to(device=self.device, dtype=self.dtype))):
                p.data = value.detach().clone()
            return self._local_loss_and_gradient()
        finally:
            for p, o in zip(self.params, originals):
                p.data = o

    def seeded_start(self, seed: int) -> Optional[torch.Tensor]:
        """The random start vector of ``seed`` (:func:`random_vector`, not normalised) when the
        start-up check already drew it (seed 0, before the first product), else None: drawing it
        again costs ~22 ns an entry (2.7 s at 124M parameters, about one product there)."""
        return self._check_start if seed == 0 else None

    def _parameter_versions(self) -> int:
        """Σ of the parameters' version counters: it moves with every in-place write."""
        return sum(p._version for p in self.params)

    def parameters_written(self) -> None:
        """Call after writing the parameters in place (even to restore them): that bumps their
        version counters, which invalidates the kept graph; it is rebuilt at the next product."""
        if self._kept_gradient is not None:
            self._kept_gradient = None
            self._graph_stale = True

    def _finite_difference_hvp(self, v: torch.Tensor, step: float) -> torch.Tensor:
        norm = float(v.norm())
        if norm == 0.0:
            return torch.zeros_like(v)
        theta, direction = self.parameters_vector(), v / norm
        _, plus = self._local_gradient_at(theta + step * direction)
        _, minus = self._local_gradient_at(theta - step * direction)
        return self.sum_over_ranks(plus - minus) * (norm / (2.0 * step))

    def build_options(self) -> Dict[str, str]:
        """``hvp_method`` and ``attention`` that build another operator on the same model the way
        this one ended up (after ``auto`` and any fallback): the memory estimate, the start-up check
        and the failed kernel tries are then skipped. What a caller building operators repeatedly
        (the monitor, the throttle's floor) passes after its first one. A partly kept graph says
        ``partial-kept-graph``: how many batches fit is measured again (its estimate pass is the
        build's first batch), the check is not made again."""
        return {"hvp_method": self.hvp_method, "attention": "math" if self.fallback == "math-attention" else "auto"}

    def describe_method(self) -> str:
        """One phrase for the report: which product ran and, for differences, its step and error."""
        text = self.hvp_method
        if text == "double-backward" and self.graph_bytes is not None and self.memory is not None:
            text += f" (kept graph ≈ {_bytes(self.graph_bytes)} > {_bytes(self.memory)} budget)"
        if text == PARTIAL and self.graph_bytes is not None and self.memory is not None:
            kept, graph = self._kept_over_ranks
            ranks = f" over {self.world_size} ranks" if self.world_size > 1 else ""
            budget = " a rank" if self.world_size > 1 else ""
            text += (f" (graphs of {kept} of {self.num_batches} batches kept{ranks}, {self.kept_fraction:.0%} of "
                     f"the samples, the rest double backward: kept graph ≈ {_bytes(graph)}{ranks}, "
                     f"over the {_bytes(self.memory)} budget{budget})")
        if self.fallback == "math-attention":
            text += " (math attention kernel: the fused kernel has no double backward)"
        if self.finite_difference is not None:
            fd = self.finite_difference
            text += f" (h={fd.step:g}, est. rel. error {fd.relative_error_estimate:.1e})"
        return text


def _byte_span(tensor: torch.Tensor) -> Tuple[int, int]:
    """[first, last) byte of ``tensor``'s storage that its elements occupy (its strides' reach)."""
    size = tensor.element_size()
    start = tensor.storage_offset() * size
    if tensor.numel() == 0:
        return start, start
    reach = sum((n - 1) * abs(st) for n, st in zip(tensor.shape, tensor.stride()))
    return start, start + (reach + 1) * size


def _spanned_bytes(intervals: List[Tuple[int, int]]) -> int:
    """Length of the union of byte intervals [a, b)."""
    total, end = 0, -1
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def check_memory(memory: Optional[int]) -> None:
    """BadArgument unless ``memory`` is None or a positive whole number of bytes."""
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0):
        raise BadArgument("memory", memory, "must be a positive whole number of bytes")


def default_memory(device: torch.device) -> int:
    """A quarter of the device's available memory in bytes: free CUDA memory
    (``torch.cuda.mem_get_info``), else the host's available pages × page size, else 4 GiB."""
    try:
        if device.type == "cuda":
            available = torch.cuda.mem_get_info(device)[0]
        else:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError, RuntimeError):  # no sysconf (Windows), no CUDA query
        available = 4 * 2**30
    return int(available) // 4


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _depending_on_parameters(loss: torch.Tensor) -> torch.Tensor:
    """The batch loss, when it has an autograd graph; BadInput otherwise (a detached loss, or one
    computed under torch.no_grad(), would give a zero Hessian and a wrong "stable" verdict)."""
    if not loss.requires_grad:
        raise BadInput("loss(model, batch) does not depend on the trainable parameters (no autograd graph)",
                       hint="is the loss computed under torch.no_grad() or detached?")
    return loss
