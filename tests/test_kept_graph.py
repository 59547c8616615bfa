"""``hvp_method="auto"`` keeps the gradient graph when its estimated bytes fit the ``memory`` budget
(issue #16 item 3): the estimate is the first batch's saved tensors scaled by the samples, the
choice flips exactly at the budget, and past it the graphs of as many leading batches as fit are
kept (``partial-kept-graph``), the rest double-backward; every method gives the same products, and
under several ranks every rank agrees on the label and the price."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

import pytest
import torch

from curvdiag.curvature.operator import CurvatureOperator, _byte_span, _spanned_bytes, default_memory
from curvdiag.errors import BadArgument
from models import MarkedOnceDifferentiableTanh


def _mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _setup(num_batches=64, size=4, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    batches = [(torch.randn(size, 6, dtype=torch.float64), torch.randn(size, 1, dtype=torch.float64))
               for _ in range(num_batches)]
    return model, batches


def test_64_small_batches_keep_the_graph_and_the_estimate_scales_with_the_batches():
    model, batches = _setup()
    op = CurvatureOperator(model, batches, _mse, [4] * 64)
    one = CurvatureOperator(model, batches[:1], _mse, [4])
    assert op.hvp_method == "kept-graph" and op.describe_method() == "kept-graph"
    assert one.graph_bytes > 0 and op.graph_bytes == 64 * one.graph_bytes
    assert op.memory > op.graph_bytes and op.memory > 0


def test_the_default_budget_is_a_quarter_of_the_available_memory(monkeypatch):
    import os

    pages = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    assert default_memory(torch.device("cpu")) == 1000 * 4096 // 4

    def missing(name):
        raise ValueError(name)

    monkeypatch.setattr(os, "sysconf", missing)
    assert default_memory(torch.device("cpu")) == 2**30


def test_the_estimate_scales_by_samples_not_batches():
    model, batches = _setup(num_batches=2)
    small = CurvatureOperator(model, batches, _mse, [4, 12]).graph_bytes
    assert small == 4 * CurvatureOperator(model, batches[:1], _mse, [4]).graph_bytes


def test_a_batch_sliced_from_one_data_tensor_counts_its_rows_not_the_data_set():
    """Batches that are row slices of one big data tensor (a TensorDataset, digits in memory) keep
    only their own rows alive in the graph: the estimate is that of the same batches copied (up to
    the columns a slice spans between its rows)."""
    model, _ = _setup()
    data = torch.randn(4096, 7, dtype=torch.float64)
    sliced = [(data[i:i + 4, :6], data[i:i + 4, 6:]) for i in range(0, 64 * 4, 4)]
    copied = [(x.clone(), y.clone()) for x, y in sliced]
    estimate = CurvatureOperator(model, copied, _mse, [4] * 64).graph_bytes
    assert estimate <= CurvatureOperator(model, sliced, _mse, [4] * 64).graph_bytes <= 1.1 * estimate
    assert estimate < 64 * data.numel() * data.element_size() / 100  # counted whole, 64 × 229 KiB


def test_byte_spans_merge_overlapping_views():
    base = torch.zeros(100, dtype=torch.float32)
    assert _byte_span(base[10:20]) == (40, 80)
    assert _byte_span(base.view(10, 10)[:, 2]) == (8, 8 + (9 * 10 + 1) * 4)  # a strided column spans its rows
    assert _spanned_bytes([(0, 40), (20, 80), (100, 120), (110, 115)]) == 100


def test_parameters_are_not_counted():
    """One sample through a 200×200 layer: the graph saves the weight (320 KB), not counted, and
    activations of a few KB."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(200, 200), torch.nn.Tanh(), torch.nn.Linear(200, 1)).double()
    batch = (torch.randn(1, 200, dtype=torch.float64), torch.randn(1, 1, dtype=torch.float64))
    op = CurvatureOperator(model, [batch], _mse)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 0 < op.graph_bytes < parameter_bytes / 20


def test_the_choice_flips_at_the_budget_and_every_method_gives_the_same_products():
    model, batches = _setup()
    estimate = CurvatureOperator(model, batches, _mse, [4] * 64).graph_bytes
    per_batch = estimate // 64
    kept = CurvatureOperator(model, batches, _mse, [4] * 64, memory=estimate)
    short = CurvatureOperator(model, batches, _mse, [4] * 64, memory=estimate - 1)
    one = CurvatureOperator(model, batches, _mse, [4] * 64, memory=per_batch)
    tiny = CurvatureOperator(model, batches, _mse, [4] * 64, memory=per_batch - 1)
    assert [op.hvp_method for op in (kept, short, one, tiny)] == [
        "kept-graph", "partial-kept-graph", "partial-kept-graph", "double-backward"]
    assert [op.kept_batches for op in (kept, short, one, tiny)] == [64, 63, 1, 0]
    assert tiny.describe_method().startswith("double-backward (kept graph ≈ ") and "budget)" in tiny.describe_method()
    assert short.describe_method().startswith("partial-kept-graph (graphs of 63 of 64 batches kept, 98% of the samples")
    assert kept._kept_gradient is not None and tiny._kept_gradient is None
    v = torch.randn(kept.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = kept.hvp(v)
    for op in (short, one, tiny):
        assert torch.allclose(op.hvp(v), expected, rtol=0, atol=1e-10 * float(expected.abs().max()))
        assert op.loss() == pytest.approx(kept.loss(), rel=1e-12)
        assert torch.allclose(op.gradient(), kept.gradient(), rtol=0, atol=1e-12)
    assert tiny.hvp_price == 3.0 and kept.hvp_price == 1.5
    assert one.hvp_price == pytest.approx(1.5 / 64 + 3.0 * 63 / 64) and short.hvp_price == pytest.approx(1.5 * 63 / 64 + 3.0 / 64)


def _eight_counted_batches():
    """8 batches of 4, a loss that counts its calls (the forwards), and one batch's graph bytes."""
    model, batches = _setup(num_batches=8)
    calls = []

    def counted(m, b):
        calls.append(1)
        return _mse(m, b)

    return model, batches, counted, calls, CurvatureOperator(model, batches, _mse, [4] * 8).graph_bytes // 8


def test_a_partly_kept_graph_runs_forwards_only_for_the_batches_it_does_not_keep():
    """A product goes back through the kept graphs of the first k batches and makes a fresh
    forward and double backward for each of the others: B − k loss calls a product."""
    model, batches, counted, calls, per_batch = _eight_counted_batches()
    for memory, kept in ((3 * per_batch, 3), (8 * per_batch, 8), (per_batch - 1, 0)):
        op = CurvatureOperator(model, batches, counted, [4] * 8, memory=memory)
        assert op.kept_batches == kept
        calls.clear()
        op.hvp(torch.ones(op.num_params, dtype=torch.float64))
        assert len(calls) == 8 - kept


def test_a_partly_kept_graph_built_again_chooses_again_and_makes_no_check():
    """An operator built from a partly kept graph's ``build_options`` at other weights (the monitor,
    --sharpness-every): the kept batches are chosen again from a new estimate, and the start-up
    check's product is not made again: B forwards at set-up (loss and gradient) where ``auto`` makes
    B − k more for the check. Its products still equal a kept graph's, B − k forwards each."""
    model, batches, counted, calls, per_batch = _eight_counted_batches()
    first = CurvatureOperator(model, batches, counted, [4] * 8, memory=3 * per_batch)
    assert (first.hvp_method, first.kept_batches, len(calls)) == ("partial-kept-graph", 3, 8 + 5)  # set-up + check
    options = first.build_options()
    assert options == {"hvp_method": "partial-kept-graph", "attention": "auto"}
    with torch.no_grad():
        model[0].weight.mul_(1.1)
    for memory, kept, method in ((3 * per_batch, 3, "partial-kept-graph"), (8 * per_batch, 8, "kept-graph"),
                                 (per_batch - 1, 0, "double-backward")):
        calls.clear()
        again = CurvatureOperator(model, batches, counted, [4] * 8, memory=memory, **options)
        # (with nothing kept, the estimate's forward of the first batch is not the build's)
        assert (again.hvp_method, again.kept_batches, len(calls)) == (method, kept, 8 + (kept == 0))
        assert not again.check_reused and again._check_product is None
        v = torch.randn(again.num_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        reference = CurvatureOperator(model, batches, _mse, [4] * 8, hvp_method="kept-graph").hvp(v)
        calls.clear()
        assert torch.allclose(again.hvp(v), reference, rtol=0, atol=1e-12) and len(calls) == 8 - kept


def test_a_partly_kept_graph_that_falls_back_to_finite_differences_keeps_nothing():
    model, batches, loss, exact = _once_differentiable_target()
    op = CurvatureOperator(model, batches * 4, loss, [8] * 4, fd_step=1e-4, memory=10)
    assert (op.hvp_method, op.kept_batches, op.kept_fraction, op._kept_gradient) == ("finite-difference", 0, 0.0, None)
    assert op.hvp_price == 2.0


def test_a_partly_kept_graph_keeps_the_leading_batches_that_fit_and_its_product_is_the_hessians():
    """Unequal batches (9, 4, 6, 5 samples): the budget for the first two keeps exactly those two,
    in bytes per sample; loss, gradient and products equal a dense double-backward Hessian's, also
    after the weights are written in place (the kept part is rebuilt at the next product)."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    sizes = [9, 4, 6, 5]
    batches = [(torch.randn(n, 5, dtype=torch.float64), torch.randn(n, 2, dtype=torch.float64)) for n in sizes]
    whole = CurvatureOperator(model, batches, _mse, sizes)
    per_sample = whole.graph_bytes / sum(sizes)
    op = CurvatureOperator(model, batches, _mse, sizes, memory=int(per_sample * 13) + 1)
    assert (op.hvp_method, op.kept_batches, op.kept_fraction) == ("partial-kept-graph", 2, 13 / 24)
    assert op.build_options() == {"hvp_method": "partial-kept-graph", "attention": "auto"}  # measured again where rebuilt

    def dense():
        shapes = [p.shape for p in model.parameters()]
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

        def mean_loss(flat):
            pieces = [piece.reshape(shape) for piece, shape in zip(torch.split(flat, [s.numel() for s in shapes]), shapes)]
            weights = dict(zip([n for n, _ in model.named_parameters()], pieces))
            call = lambda x: torch.func.functional_call(model, weights, (x,))  # noqa: E731
            return sum(n * _mse(call, b) for n, b in zip(sizes, batches)) / sum(sizes)

        return mean_loss(theta), torch.autograd.functional.hessian(mean_loss, theta)

    loss, hessian = dense()
    assert op.loss() == pytest.approx(float(loss), rel=1e-12)
    v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.allclose(op.hvp(v), hessian @ v, rtol=0, atol=1e-12)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    op.parameters_written()
    _, moved = dense()
    assert not torch.allclose(moved @ v, hessian @ v)
    assert torch.allclose(op.hvp(v), moved @ v, rtol=0, atol=1e-12)


@pytest.mark.parametrize("memory", [0, -5, 1.5, "4G", True, float("inf")])
def test_a_bad_memory_is_refused(memory):
    model, batches = _setup(num_batches=1)
    with pytest.raises(BadArgument, match=r"^memory=.*: must be a positive whole number of bytes$"):
        CurvatureOperator(model, batches, _mse, memory=memory)


def test_explicit_methods_measure_nothing():
    model, batches = _setup(num_batches=2)
    op = CurvatureOperator(model, batches, _mse, hvp_method="double-backward", memory=1)
    assert (op.hvp_method, op.graph_bytes, op.describe_method()) == ("double-backward", None, "double-backward")


def _rank(rank, world, out_dir, memory):
    """One gloo rank: rank 0 holds 1 batch, rank 1 eight: the whole graph fits on rank 0 only."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{Path(out_dir, 'store')}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        model, batches = _setup(num_batches=8)
        mine = batches[:1] if rank == 0 else batches
        op = CurvatureOperator(model, mine, _mse, [4] * len(mine), memory=memory, distributed=True)
        v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
            [op.hvp_method, op.graph_bytes, op.kept_batches, op.hvp_price, op.hvp(v).tolist(), op.describe_method()]))
    finally:
        torch.distributed.destroy_process_group()


def test_each_rank_keeps_what_fits_and_all_agree_on_the_method_and_its_price(tmp_path):
    import torch.multiprocessing as mp

    model, batches = _setup(num_batches=8)
    per_batch = CurvatureOperator(model, batches[:1], _mse, [4]).graph_bytes
    out_dir = tmp_path
    context = mp.start_processes(_rank, args=(2, str(out_dir), 4 * per_batch), nprocs=2, join=False,
                                 start_method="fork")
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        assert time.monotonic() < deadline, "ranks still ran after 60 s"
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    price = 1.5 * 5 / 9 + 3.0 * 4 / 9  # 5 of the 9 batches' samples are kept: 1 on rank 0, 4 on rank 1
    assert [r[:3] for r in results] == [["partial-kept-graph", per_batch, 1], ["partial-kept-graph", 8 * per_batch, 4]]
    assert results[0][3] == pytest.approx(price) and results[1][3] == pytest.approx(price)
    one = CurvatureOperator(model, batches[:1] + batches, _mse, [4] * 9, hvp_method="double-backward")
    expected = one.hvp(torch.randn(one.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    for r in results:
        assert torch.allclose(torch.tensor(r[4], dtype=torch.float64), expected, rtol=0, atol=1e-12)
        assert r[5].startswith("partial-kept-graph (graphs of 5 of 9 batches kept over 2 ranks, 56% of the samples")
        assert "over 2 ranks, over the" in r[5] and "budget a rank)" in r[5]


def test_memory_flag_picks_double_backward_or_a_partly_kept_graph_and_refuses_a_non_size():
    from typer.testing import CliRunner

    from curvdiag.cli.app import app
    from conftest import RECIPES

    runner = CliRunner()
    tiny = str(RECIPES / "tiny_mlp.py")
    result = runner.invoke(app, ["probe", tiny, "--probes", "lambda_max", "--memory", "100", "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["operator"]["hvp_method"] == "double-backward"
    assert "budget" in report["operator"]["description"]
    # tiny_mlp's graph is ~1.06 KiB over 2 unequal batches (70% of the samples in the first)
    part = runner.invoke(app, ["probe", tiny, "--probes", "lambda_max", "--memory", "1KiB", "--json", "-", "-q"])
    operator = json.loads(part.stdout)["operator"]
    assert operator["hvp_method"] == "partial-kept-graph"
    assert operator["description"].startswith("partial-kept-graph (graphs of 1 of 2 batches kept, 70% of the samples")
    assert json.loads(part.stdout)["probes"]["lambda_max"]["value"] == pytest.approx(
        report["probes"]["lambda_max"]["value"], rel=1e-5)
    roomy = runner.invoke(app, ["probe", tiny, "--probes", "lambda_max", "--memory", "2GiB", "--json", "-", "-q"])
    assert json.loads(roomy.stdout)["operator"]["hvp_method"] == "kept-graph"
    bad = runner.invoke(app, ["probe", tiny, "--memory", "lots"])
    assert bad.exit_code == 2 and "--memory" in bad.output and "Traceback" not in bad.output
    assert len(bad.output.strip().splitlines()) <= 2, bad.output


def test_lambda_max_reuses_the_start_up_check_product_only_when_it_is_the_same_product():
    """The auto operator's check multiplies Lanczos' seed-0 start vector: lambda_max(seed=0) makes one
    product fewer, with the same answer; another seed, or weights written in place since, make all."""
    from curvdiag.curvature.operator import CurvatureOperator
    from curvdiag.probes.sharpness import lambda_max

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    batch = (torch.randn(20, 6), torch.randint(0, 3, (20,)))
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731

    def measured(seed, write_first=False):
        op = CurvatureOperator(model, [batch], loss)
        if write_first:
            with torch.no_grad():
                model[0].weight.mul_(1.0)  # same values, new version: the check's product may be stale
        made = []
        inner_hvp = op._local_hvp
        op._local_hvp = lambda v: made.append(1) or inner_hvp(v)
        result = lambda_max(op, tol=1e-6, seed=seed)
        assert op.check_reused == (len(made) == result.hvps - 1)
        return result, len(made)

    import curvdiag.probes.eigen as eigen

    drawn = []
    original_draw = eigen.random_vector
    eigen.random_vector = lambda *a, **k: drawn.append(1) or original_draw(*a, **k)
    try:
        reused, made = measured(0)
    finally:
        eigen.random_vector = original_draw
    assert made == reused.hvps - 1 and reused.hvps > 1
    assert not drawn  # the start vector too was the check's, not drawn again
    other, made_other = measured(1)
    assert made_other == other.hvps
    written, made_written = measured(0, write_first=True)
    assert made_written == written.hvps
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def flat_loss(flat):
        pieces = torch.split(flat, [s.numel() for s in shapes])
        weights = {name: piece.reshape(shape) for name, piece, shape in zip(names, pieces, shapes)}
        return loss(lambda x: torch.func.functional_call(model, weights, (x,)), batch)

    exact = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(flat_loss, theta))[-1])
    for result in (reused, other, written):
        assert result.value == pytest.approx(exact, rel=1e-5)


def test_the_kept_graph_takes_over_the_memory_estimates_first_batch():
    """auto builds the first batch's graph once (the estimate's, weighted as the build weights it):
    one loss call per batch at set-up, and the same products as an operator built without it."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    batches = [(torch.randn(n, 5), torch.randn(n, 2)) for n in (9, 4, 6)]  # unequal: weights ≠ 1
    calls = []

    def loss(m, b):
        calls.append(1)
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    auto = CurvatureOperator(model, batches, loss, [9, 4, 6])
    assert auto.hvp_method == "kept-graph" and len(calls) == 3 and auto.gradient_seconds > 0
    plain = CurvatureOperator(model, batches, loss, [9, 4, 6], hvp_method="kept-graph")
    v = torch.randn(auto.size, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(auto.hvp(v), plain.hvp(v), rtol=1e-6, atol=1e-7)
    assert auto.loss() == pytest.approx(plain.loss(), rel=1e-7)
    assert torch.allclose(auto.gradient(), plain.gradient(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("recipe,checkpoint", [("tanh_mlp", "tanh_edge.pt"), ("bn_cnn", "bn_cnn.pt"),
                                               ("tiny_transformer", "tiny_transformer.pt")])
def test_a_kept_graph_product_does_at_most_twice_the_arithmetic_of_a_gradient(recipe, checkpoint):
    # Reverse over the kept gradient graph costs 2× a gradient's matrix products on a dense layer (6
    # against 3: dW = δᵀx, δx = δW and y = xWᵀ each differentiated in both operands), the floor of an
    # exact product (Pearlmutter's R-op makes the same 6); a double backward per product also redoes
    # the forward and backward (≈ 3×). Counted, not timed: FLOPs are the same on any machine.
    from torch.utils.flop_counter import FlopCounterMode

    from curvdiag.loading.target import load_target

    root = Path(__file__).resolve().parent.parent / "sample_models"
    target = load_target(str(root / f"{recipe}.py"), str(root / "checkpoints" / checkpoint))
    params = [p for p in target.model.parameters() if p.requires_grad]
    target.model.eval()
    with FlopCounterMode(display=False) as counter:
        for batch in target.batches:
            torch.autograd.grad(target.loss_fn(target.model, batch), params)
    gradient = counter.get_total_flops()
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
    ratios = {}
    for method in ("kept-graph", "double-backward"):
        op = CurvatureOperator(target.model, target.batches, target.loss_fn, target.batch_sizes, hvp_method=method)
        op.hvp(v)  # the transformer's first product finds no double backward and switches to math attention
        with FlopCounterMode(display=False) as counter:
            op.hvp(v)
        ratios[method] = counter.get_total_flops() / gradient
    assert 1.7 <= ratios["kept-graph"] <= 2.1, ratios  # the transformer's math attention in the product: 2.08
    assert ratios["double-backward"] >= ratios["kept-graph"] + 0.8, ratios


@pytest.mark.parametrize("method", ["kept-graph", "double-backward"])
def test_an_explicit_exact_method_switches_to_math_attention_when_the_fused_kernel_has_no_double_backward(method):
    from curvdiag.loading.target import load_target

    root = Path(__file__).resolve().parent.parent / "sample_models"
    target = load_target(str(root / "tiny_transformer.py"), str(root / "checkpoints" / "tiny_transformer.pt"),
                         dtype="float64")
    explicit = CurvatureOperator(target.model, target.batches, target.loss_fn, target.batch_sizes, hvp_method=method)
    checked = CurvatureOperator(target.model, target.batches, target.loss_fn, target.batch_sizes, attention="math")
    assert explicit.fallback is None  # no check at start-up: nothing measured, nothing switched yet
    v = torch.randn(explicit.size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(explicit.hvp(v), checked.hvp(v), rtol=1e-9, atol=1e-12)
    assert explicit.fallback == "math-attention" and "double backward" in explicit.describe_method()
    assert explicit.hvp_method == method and explicit.hvp_count == 1
    torch.testing.assert_close(torch.tensor(explicit.loss()), torch.tensor(checked.loss()), rtol=1e-12, atol=0)


def _once_differentiable_target():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    loss = lambda m, batch: ((MarkedOnceDifferentiableTanh.apply(m(batch[0])) - batch[1]) ** 2).mean()  # noqa: E731
    exact = lambda m, batch: ((torch.tanh(m(batch[0])) - batch[1]) ** 2).mean()  # noqa: E731
    return model, [(x, y)], loss, exact


def test_a_once_differentiable_backward_falls_back_to_finite_differences_instead_of_a_silent_zero():
    # torch differentiates through a @once_differentiable backward without an error and adds
    # nothing: the product would miss that function's second derivative (here the whole of it).
    model, batches, loss, exact = _once_differentiable_target()
    op = CurvatureOperator(model, batches, loss, [8], fd_step=1e-4)
    reference = CurvatureOperator(model, batches, exact, [8])
    assert op.hvp_method == "finite-difference" and op.fallback == "finite-difference"
    assert "once_differentiable" in op.fallback_reason
    v = torch.randn(op.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op.hvp(v), reference.hvp(v), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", ["kept-graph", "double-backward"])
def test_an_explicit_exact_method_refuses_a_once_differentiable_backward_and_stays_as_it_was(method):
    model, batches, loss, _ = _once_differentiable_target()
    if method == "kept-graph":  # the kept graph is built at set-up: refused there
        with pytest.raises(RuntimeError, match="once_differentiable"):
            CurvatureOperator(model, batches, loss, [8], hvp_method=method)
        return
    op = CurvatureOperator(model, batches, loss, [8], hvp_method=method)
    spent, gradient = op.spent, op.gradient().clone()
    with pytest.raises(RuntimeError, match="once_differentiable"):  # math attention retried, in vain
        op.hvp(torch.ones(op.size, dtype=torch.float64))
    assert op.fallback is None and op.build_options() == {"hvp_method": method, "attention": "auto"}
    assert "math attention" not in op.describe_method()
    assert op.spent == spent + op.hvp_price  # the failed product only, no rebuild charged
    torch.testing.assert_close(op.gradient(), gradient)


class _LongAttention(torch.nn.Module):
    """Two heads of fused self-attention over 128 positions: math attention's graph keeps 2 × 128²
    attention weights per sample, which the fused CPU kernel recomputes."""

    def __init__(self, d: int = 8, heads: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, 3)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.out(a.mean(dim=1))


def test_after_the_switch_to_math_attention_the_graph_is_measured_again_in_that_kernel():
    """The fused kernel has no double backward on CPU, so auto runs math attention, whose graph is
    ~19× the fused one here: the kept batches are chosen from the math graph's bytes (before, a
    2 MiB budget kept the whole 6.3 MiB math graph, chosen from the fused 0.33 MiB)."""
    model = _LongAttention().double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 128, 8, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64))
               for _ in range(4)]
    fused = CurvatureOperator(model, batches, _mse, [2] * 4, hvp_method="double-backward")
    assert fused.fallback is None
    math_graph = CurvatureOperator(model, batches, _mse, [2] * 4, attention="math").graph_bytes
    op = CurvatureOperator(model, batches, _mse, [2] * 4, memory=2 * 2**20)
    assert op.fallback == "math-attention" and op.graph_bytes == math_graph > 2 * 2**20
    assert op.hvp_method == "partial-kept-graph" and op.kept_batches == (2 * 2**20) // (math_graph // 4)
    whole = CurvatureOperator(model, batches, _mse, [2] * 4, hvp_method="kept-graph", attention="math")
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(op.hvp(v), whole.hvp(v), rtol=1e-10, atol=1e-12)
