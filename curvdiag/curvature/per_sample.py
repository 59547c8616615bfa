"""Per-sample squared gradient norms of a model's outputs along given directions, by ``torch.func``.

For a model whose samples are independent, f_i(θ) = model(x_i)[0] is sample i's output (shape
``out.shape[1:]``), x_i being sample i's slice of every model input whose first dimension is the
sample dimension (the model runs on a batch of one). For directions c_id shaped like f_i, the
squared norms per parameter tensor t

    s_idt = ‖∂(c_idᵀ f_i)/∂θ_t‖²,    shape (n, D, T),

come from one ``vjp`` per sample (``vmap`` over samples) and one pull-back per direction
(``vmap`` over directions), in chunks of samples × directions so that the per-sample gradients of
a chunk (chunk samples × chunk directions × parameters) stay under ``max_bytes``. Any model,
weight tying, bare parameters and modules of any type included: the Jacobian is the model's own.

That f_i is sample i's output of the batched forward is checked, never assumed
(:meth:`PerSampleModel.check`): the outputs agree, and Σ_i ∂(v_iᵀ f_i)/∂θ equals autograd's
∂(vᵀ out)/∂θ for a random v — false for a model that mixes samples (BatchNorm in train mode), a
model input wrongly taken as per-sample, or ops ``torch.func`` cannot transform; each refused
with :class:`~curvdiag.errors.NotCovered`.

Cost (measured, one CPU thread, 10 classes, 9 directions per sample): 8–12 gradients of the batch
on the bundled BN CNN (3,866 parameters, 250 samples) and tiny transformer (26,346 parameters,
500 samples, math attention); the first call in a process pays ~1 s of ``torch.func`` start-up.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from curvdiag.curvature.output_hessian import model_output_tensor
from curvdiag.errors import NotCovered

#: Per-sample gradients held at once (chunk samples × chunk directions × parameters × bytes).
MAX_PER_SAMPLE_BYTES = 2 ** 26


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160] if lines else ''}"


class PerSampleModel:
    """``model`` as n independent functions f_i(θ) of its trainable parameters ``names``/``params``,
    from the (args, kwargs) of one recorded batched call on n samples.

    Counts: ``passes`` (vmapped calls, each a forward and backward over one chunk) and
    ``vjps`` (sample × direction pull-backs)."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str], params: Sequence[torch.nn.Parameter],
                 args: tuple, kwargs: dict, n: int, max_bytes: Optional[int] = None):
        self.model, self.names, self.n = model, list(names), n
        self.max_bytes = MAX_PER_SAMPLE_BYTES if max_bytes is None else max_bytes
        self.params = {name: p.detach() for name, p in zip(names, params)}
        self.numel = sum(p.numel() for p in params)
        self.itemsize = params[0].element_size()
        leaves, self._spec = tree_flatten((args, kwargs))
        self._batched = [isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == n for t in leaves]
        if not any(self._batched):
            raise NotCovered(f"no model input has the sample dimension ({n}) first: no per-sample outputs")
        self._leaves = [t.detach() if b else t for t, b in zip(leaves, self._batched)]
        self.passes = 0
        self.vjps = 0

    def _output(self, params: Dict[str, torch.Tensor], sample: List[torch.Tensor]) -> torch.Tensor:
        """f_i: the model on a batch of one (the sample's batched inputs, the other inputs as they were)."""
        it = iter(sample)
        leaves = [next(it).unsqueeze(0) if b else t for t, b in zip(self._leaves, self._batched)]
        args, kwargs = tree_unflatten(leaves, self._spec)
        out = model_output_tensor(torch.func.functional_call(self.model, params, tuple(args), dict(kwargs)))
        if not isinstance(out, torch.Tensor):
            raise NotCovered(f"the model returns {type(out).__name__}, not a tensor")
        return out[0]

    def _chunk(self, start: int, stop: int) -> List[torch.Tensor]:
        return [t[start:stop] for t, b in zip(self._leaves, self._batched) if b]

    def _sizes(self, directions: int) -> Tuple[int, int]:
        """(samples, directions) per chunk under ``max_bytes``."""
        per = max(self.numel * self.itemsize, 1)
        d = max(1, min(directions, self.max_bytes // per))
        return max(1, min(self.n, self.max_bytes // (per * d))), d

    def squares(self, directions: torch.Tensor) -> torch.Tensor:
        """s_idt = ‖∂(c_idᵀ f_i)/∂θ_t‖² for ``directions`` c of shape (n, D, *f_i.shape): (n, D, T),
        float64, T = parameter tensors in ``names`` order."""
        n, dirs = directions.shape[0], directions.shape[1]
        names = self.names

        def one(sample: List[torch.Tensor], cot: torch.Tensor) -> torch.Tensor:
            _, pull = torch.func.vjp(lambda p: self._output(p, sample), self.params)
            grads = torch.func.vmap(pull)(cot)[0]
            return torch.stack([grads[k].double().pow(2).flatten(1).sum(1) for k in names], 1)

        batched = torch.func.vmap(one)
        cs, cd = self._sizes(dirs)
        result = torch.empty(n, dirs, len(names), dtype=torch.float64, device=directions.device)
        try:
            for s in range(0, n, cs):
                sample = self._chunk(s, s + cs)
                for d in range(0, dirs, cd):
                    cot = directions[s:s + cs, d:d + cd]
                    result[s:s + cs, d:d + cd] = batched(sample, cot)
                    self.passes += 1
                    self.vjps += cot.shape[0] * cot.shape[1]
        except NotCovered:
            raise
        except Exception as exc:  # noqa: BLE001 -- an op torch.func cannot transform: refuse, say which
            raise NotCovered(f"no per-sample gradients through torch.func ({_first_line(exc)})") from exc
        return result

    def check(self, out: torch.Tensor, params: Sequence[torch.nn.Parameter], tol: float) -> int:
        """f_i equals row i of the batched ``out`` (kept graph), and Σ_i ∂(v_iᵀ f_i)/∂θ equals
        autograd's ∂(vᵀ out)/∂θ for a seeded random v; :class:`NotCovered` otherwise. Returns the
        backward passes spent outside torch.func (1)."""
        gen = torch.Generator(device="cpu").manual_seed(20240608)
        v = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
        auto = torch.autograd.grad(out, list(params), v, retain_graph=True, allow_unused=True)
        auto = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(auto, params)]
        names = self.names
        mixing = ("the model mixes samples (e.g. BatchNorm in train mode): a sample's output alone "
                  "differs from its output in the batch")
        try:  # sample 0 alone, by a plain forward: mixing is named before torch.func sees the model
            with torch.no_grad():
                first = self._output({}, [t[0] for t in self._chunk(0, 1)])
        except NotCovered:
            raise
        except Exception as exc:  # noqa: BLE001
            raise NotCovered(f"a sample alone cannot be run through the model ({_first_line(exc)})") from exc
        ref = out.detach()[0]
        if first.shape != ref.shape or float((first.double() - ref.double()).norm()) > \
                tol * float(first.double().norm() + ref.double().norm()) + 1e-300:
            raise NotCovered(mixing)

        def one(sample: List[torch.Tensor], cot: torch.Tensor):
            value, pull = torch.func.vjp(lambda p: self._output(p, sample), self.params)
            grads = pull(cot)[0]
            return value, [grads[k] for k in names]

        batched = torch.func.vmap(one)
        cs, _ = self._sizes(1)
        mine = [torch.zeros_like(g) for g in auto]
        values = []
        try:
            for s in range(0, self.n, cs):
                value, grads = batched(self._chunk(s, s + cs), v[s:s + cs])
                values.append(value.detach())
                for total, g in zip(mine, grads):
                    total.add_(g.detach().sum(0))
                self.passes += 1
                self.vjps += value.shape[0]
        except NotCovered:
            raise
        except Exception as exc:  # noqa: BLE001
            raise NotCovered(f"no per-sample gradients through torch.func ({_first_line(exc)})") from exc
        alone = torch.cat(values)
        if alone.shape != out.shape:
            raise NotCovered(f"a sample's output alone has shape {tuple(alone.shape[1:])}, in the batch "
                             f"{tuple(out.shape[1:])}: no per-sample outputs")
        scale = float(out.detach().double().norm()) + float(alone.double().norm())
        if float((alone.double() - out.detach().double()).norm()) > tol * scale + 1e-300:
            raise NotCovered(mixing)
        err = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(auto, mine)) ** 0.5
        size = (sum(float(a.double().pow(2).sum()) for a in auto) ** 0.5
                + sum(float(b.double().pow(2).sum()) for b in mine) ** 0.5)
        if err > tol * size + 1e-300:
            raise NotCovered(mixing.replace("output alone differs from its output", "gradient alone differs "
                                            "from its share of the gradient"))
        return 1

