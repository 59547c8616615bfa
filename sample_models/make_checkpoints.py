"""Regenerate every bundled sample-model checkpoint deterministically.

    python sample_models/make_checkpoints.py              # all samples
    python sample_models/make_checkpoints.py --only tanh  # one (or more: --only tanh --only adam_mlp)

Each recipe is imported by file path (exactly as curvdiag loads it) and trained
from its own ``model()`` init with its own ``optimizer()`` on its own ``data()``
(batches cycled in fixed order, one optimizer step per batch).  Checkpoints are
written to ``sample_models/checkpoints/`` as
``{"model": state_dict, "optimizer": state_dict, "step": int}`` and load with
``torch.load(path, weights_only=True)``.

For the tanh sample the top-4 Hessian eigenvalues of each checkpoint are
measured (float64 Lanczos via scipy eigsh on double-backward HVPs) and the
edge-of-stability ratio lr * lambda_max / 2 is printed.
"""
import argparse
import importlib.util
import os
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CKPT_DIR = os.path.join(HERE, "checkpoints")

# name -> (recipe file, total optimizer steps, {step: checkpoint file})
SAMPLES = {
    "tanh": ("tanh_mlp.py", 3000, {100: "tanh_early.pt", 3000: "tanh_edge.pt"}),
    "bn_cnn": ("bn_cnn.py", 300, {300: "bn_cnn.pt"}),
    "tiny_transformer": ("tiny_transformer.py", 300, {300: "tiny_transformer.pt"}),
    "adam_mlp": ("adam_mlp.py", 500, {500: "adam_mlp.pt"}),
}


def load_recipe(path):
    name = "curvdiag_sample_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _to_double(obj):
    if torch.is_tensor(obj):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_double(o) for o in obj)
    return obj


def top_hessian_eigs(recipe, state_dict, k=4):
    """Top-k eigenvalues of the Hessian of the full-data mean loss, float64 Lanczos."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    m = recipe.model().double()
    m.load_state_dict({n: v.double() if v.is_floating_point() else v for n, v in state_dict.items()})
    params = [p for p in m.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    batches = [_to_double(b) for b in recipe.data()]
    L = sum(recipe.loss(m, b) for b in batches) / len(batches)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(L, params, create_graph=True)])

    def matvec(v):
        v = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1))
        hv = torch.autograd.grad(g, params, v, retain_graph=True)
        return torch.cat([t.reshape(-1) for t in hv]).numpy()

    op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    v0 = np.random.RandomState(0).randn(n)
    vals = eigsh(op, k=k, which="LA", tol=1e-8, v0=v0, return_eigenvectors=False)
    return sorted(vals.tolist(), reverse=True)


@torch.no_grad()
def full_loss(recipe, m):
    batches = list(recipe.data())
    return float(sum(recipe.loss(m, b) for b in batches) / len(batches))


@torch.no_grad()
def heldout_accuracy(m, name):
    """Accuracy on the digits samples NOT used for training (1000..1796), eval mode."""
    from _digits import digits_flat

    x, y = digits_flat(1797)
    x, y = x[1000:], y[1000:]
    if name == "bn_cnn":
        x = x.view(-1, 1, 8, 8)
    elif name == "tiny_transformer":
        x = x.view(-1, 8, 8)
    was = m.training
    m.eval()
    acc = float((m(x).argmax(1) == y).float().mean())
    m.train(was)
    return acc


def make(name):
    fname, steps, saves = SAMPLES[name]
    recipe = load_recipe(os.path.join(HERE, fname))
    torch.manual_seed(0)
    m = recipe.model()
    m.train()
    opt = recipe.optimizer(m.parameters())
    sched = recipe.scheduler(opt) if hasattr(recipe, "scheduler") else None
    batches = list(recipe.data())
    nparams = sum(p.numel() for p in m.parameters())
    print(f"== {name} ({fname}): {nparams:,} parameters, {steps} steps, "
          f"{len(batches)} batch(es)/epoch, {type(opt).__name__}", flush=True)
    t0 = time.time()
    step = 0
    while step < steps:
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            L = recipe.loss(m, batch)
            L.backward()
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            if step in saves:
                path = os.path.join(CKPT_DIR, saves[step])
                torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(), "step": step}, path)
                msg = (f"  step {step:5d}: saved {os.path.relpath(path, os.path.dirname(HERE))} "
                       f"({os.path.getsize(path) / 1024:.0f} KiB), last-batch loss {L.item():.5f}, "
                       f"full-data loss {full_loss(recipe, m):.5f}, "
                       f"held-out acc {heldout_accuracy(m, name):.3f}")
                print(msg, flush=True)
                if name == "tanh":
                    lr = opt.param_groups[0]["lr"]
                    te = time.time()
                    eigs = top_hessian_eigs(recipe, m.state_dict())
                    print(f"      top-4 Hessian eigenvalues: {', '.join(f'{e:.3f}' for e in eigs)}; "
                          f"2/lr = {2 / lr:.3f}; ratio lr*lambda_max/2 = {lr * eigs[0] / 2:.3f} "
                          f"(Lanczos {time.time() - te:.1f}s)", flush=True)
            if step >= steps:
                break
    print(f"  done in {time.time() - t0:.1f}s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=sorted(SAMPLES), help="regenerate only this sample")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: these models are tiny, and on a shared "
                         "2-core machine 2 threads were up to 30x slower; 1 thread also makes the "
                         "float results independent of the machine's core count)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    os.makedirs(CKPT_DIR, exist_ok=True)
    t0 = time.time()
    for name in args.only or list(SAMPLES):
        make(name)
    print(f"total {time.time() - t0:.1f}s")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, HERE)
    main()
