"""The per-sample Hessian of a batch loss w.r.t. the model output, and the hooks that record layers.

Both the Gauss–Newton matrix (:mod:`curvdiag.curvature.ggn`) and HesScale
(:mod:`curvdiag.probes.hesscale`) start from A = ∂²L/∂out², restricted to its diagonal blocks:
the output ``out`` is viewed as (R, C) rows — one row per sample (HesScale: C = all outputs of a
sample) or one per sample and output position (Gauss–Newton: C = the last dimension) — and
A_r = ∂²L/∂out_r² is (C, C) per row. That A has no other blocks (the loss is a sum of per-row
terms) is checked numerically, never assumed.

How: g = ∂L/∂out with ``create_graph=True``, then the C columns A e_c of all rows at once from
one batched double backward through the loss head only (C of them when the loss has no batching
rule), then one product along a random direction compared with Σ_c A[:, c] w_c. Memory: R·C²
numbers, refused above :data:`MAX_OUTPUT_HESSIAN_ENTRIES`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, NamedTuple, Sequence, Tuple

import torch

from curvdiag.errors import NotCovered

#: At most this many entries (R·C²) in the per-row output Hessians of one batch (512 MiB in float64).
MAX_OUTPUT_HESSIAN_ENTRIES = 2 ** 26

#: What a row is, by ``per_position``, and what the refusal says when the loss couples rows.
_COUPLING = {
    False: "the loss couples samples (it is not a sum of per-sample terms)",
    True: "the loss couples the outputs of different samples or positions "
          "(its output Hessian is not block diagonal per row)",
}


def rounding_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a numerical check that holds exactly in exact arithmetic."""
    return 1e-8 if dtype == torch.float64 else 2e-3 if dtype in (torch.float16, torch.bfloat16) else 1e-4


@dataclass
class OutputHessian:
    """``blocks``: (R, C, C) symmetric A_r, in ``out``'s dtype; ``gradient``: ∂L/∂out, shaped like
    ``out``, detached; ``backwards``: backward passes spent (columns and the check)."""

    blocks: torch.Tensor
    gradient: torch.Tensor
    backwards: int


def output_hessian(loss: torch.Tensor, out: torch.Tensor, per_position: bool = False) -> OutputHessian:
    """A_r = ∂²L/∂out_r² for every row r of ``out`` (shape (n, ...)): rows are the n samples
    (C = out[0].numel()), or with ``per_position`` the n·P (sample, position) pairs (C =
    out.shape[-1]). Raises :class:`NotCovered` when the blocks would be too large, when the loss
    does not depend on ``out`` or when it couples rows. The graph of ``loss`` is retained."""
    n = out.shape[0]
    c = (out.shape[-1] if out.dim() >= 2 else 1) if per_position else (out[0].numel() if n else 0)
    rows = out.numel() // max(c, 1)
    if rows * c * c > MAX_OUTPUT_HESSIAN_ENTRIES:
        raise NotCovered(f"output of shape {tuple(out.shape)}: its per-row output Hessians would hold "
                         f"{rows * c * c:.2e} numbers (at most {MAX_OUTPUT_HESSIAN_ENTRIES:.2e}); use smaller batches")
    (g,) = torch.autograd.grad(loss, out, create_graph=True, allow_unused=True)
    if g is None:
        raise NotCovered("the loss does not depend on the model output")
    if not g.requires_grad:  # a loss linear in the output
        return OutputHessian(out.new_zeros(rows, c, c), g.detach(), 1)
    columns, backwards = _columns(g, out, rows, c)
    a = torch.stack(columns, dim=2)  # (R, C, C): column k is A e_k
    if rows > 1:
        gen = torch.Generator(device="cpu").manual_seed(20240607)
        w = torch.randn(rows, c, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
        (direct,) = torch.autograd.grad(g, out, w.view_as(out), retain_graph=True, allow_unused=True)
        backwards += 1
        direct = torch.zeros_like(w) if direct is None else direct.detach().reshape(rows, c)
        blocks = torch.einsum("rcd,rd->rc", a, w)
        tol = rounding_tolerance(out.dtype)
        if float((direct - blocks).norm()) > tol * float(direct.norm() + blocks.norm()) + 1e-300:
            raise NotCovered(_COUPLING[per_position])
    return OutputHessian((a + a.transpose(1, 2)).mul_(0.5), g.detach(), backwards)


def _columns(g: torch.Tensor, out: torch.Tensor, rows: int, c: int) -> Tuple[List[torch.Tensor], int]:
    """([A e_k for k < C], backward passes): e_k in every row at once, one batched double
    backward, or C of them when some op of the loss has no batching rule."""
    basis = torch.eye(c, device=out.device, dtype=out.dtype).view(c, 1, c).expand(c, rows, c).reshape(c, *out.shape)

    def column(h: Any) -> torch.Tensor:
        return out.new_zeros(rows, c) if h is None else h.detach().reshape(rows, c)

    try:
        (h,) = torch.autograd.grad(g, out, basis, retain_graph=True, allow_unused=True, is_grads_batched=True)
        return [column(None if h is None else h[k]) for k in range(c)], 1
    except Exception:  # noqa: BLE001 -- no batching rule for some op of the loss: one column at a time
        return [column(torch.autograd.grad(g, out, basis[k], retain_graph=True, allow_unused=True)[0])
                for k in range(c)], c


# ---------------------------------------------------------------------------- recording layers
class LayerCall(NamedTuple):
    """One call of a recorded layer: its first input and its output as in the graph, its mode."""

    input: Any
    output: Any
    training: bool


@dataclass
class Recording:
    """What the hooks saw in one forward pass: ``calls[i]`` the calls of ``layers[i]``, ``outputs``
    what the model itself returned and ``inputs`` its (args, kwargs) (once per call of the model)."""

    calls: Dict[int, List[LayerCall]] = field(default_factory=dict)
    outputs: List[Any] = field(default_factory=list)
    inputs: List[Tuple[tuple, dict]] = field(default_factory=list)


def model_output_tensor(out: Any) -> Any:
    """The model output the Gauss–Newton matrix is taken at: ``out`` itself when a tensor; the
    ``logits`` of a mapping such as a Hugging Face ``ModelOutput`` (whose ``loss``, when labels
    were passed, is computed from those logits); else ``out`` unchanged (the caller refuses it)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        logits = out.get("logits")
        if isinstance(logits, torch.Tensor):
            return logits
    return out


@contextlib.contextmanager
def recording(model: torch.nn.Module, layers: Sequence[torch.nn.Module]) -> Iterator[Recording]:
    """Forward hooks recording each layer's input and output and the model's inputs and output; in-place
    activations are made out-of-place meanwhile (recorded tensors must keep their values)."""
    seen = Recording()
    handles = []
    inplace = [m for m in layers if getattr(m, "inplace", False) is True]

    def layer_hook(index: int):
        def hook(module, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()), None)
            seen.calls.setdefault(index, []).append(LayerCall(x, output, module.training))
        return hook

    try:
        for m in inplace:
            m.inplace = False
        for index, m in enumerate(layers):
            handles.append(m.register_forward_hook(layer_hook(index), with_kwargs=True))
        def model_hook(module, args, kwargs, output):
            seen.inputs.append((args, kwargs))
            seen.outputs.append(output)

        handles.append(model.register_forward_hook(model_hook, with_kwargs=True))
        yield seen
    finally:
        for handle in handles:
            handle.remove()
        for m in inplace:
            m.inplace = True
