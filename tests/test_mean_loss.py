"""Issue 12, item 6: a loss that sums over the batch (every curvature n× off) is refused with one
line and a hint, from the CLI (exit 2) and the API (BadInput); batches that cannot be split are
not checked, and the check leaves the model (modes, buffers) and the RNG as they were."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import curvdiag
from conftest import RECIPES
from curvdiag.cli.app import app
from curvdiag.errors import BadInput
from curvdiag.loading.recipe import leading_dimension
from curvdiag.loading.target import check_mean_loss


def _size(batch):
    return leading_dimension(batch)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5),
                               torch.nn.Linear(8, 3))


def _data(n=9):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def tuple_loss(reduction):
    return lambda model, batch: F.cross_entropy(model(batch[0]), batch[1], reduction=reduction)


def dict_loss(reduction):
    return lambda model, batch: F.cross_entropy(model(batch["x"]), batch["y"], reduction=reduction)


@pytest.mark.parametrize("make_batch, make_loss", [
    (lambda x, y: (x, y), tuple_loss),
    (lambda x, y: {"x": x, "y": y, "note": "text"}, dict_loss),
], ids=["tuple", "dict"])
def test_a_sum_is_refused_and_a_mean_passes(make_batch, make_loss):
    model, batch = _model(), make_batch(*_data())
    check_mean_loss(model, make_loss("mean"), batch, _size)
    with pytest.raises(BadInput, match=r"returns the sum over the batch, not its mean: .* a batch of 9 samples") as caught:
        check_mean_loss(model, make_loss("sum"), batch, _size, what="recipe r.py: ")
    assert caught.value.message.startswith("recipe r.py: loss(model, batch)") and "\n" not in caught.value.message
    assert "reduction=\"mean\"" in caught.value.hint and "9x too large" in caught.value.hint


def test_a_mean_plus_a_regulariser_passes_and_a_sum_over_a_fixed_count_does_not():
    model, batch = _model(), _data()

    def regularised(model, batch):
        return tuple_loss("mean")(model, batch) + 0.1 * sum(p.pow(2).sum() for p in model.parameters())

    def over_fixed(model, batch):
        return tuple_loss("sum")(model, batch) / 32

    check_mean_loss(model, regularised, batch, _size)
    with pytest.raises(BadInput):
        check_mean_loss(model, over_fixed, batch, _size)


def test_a_token_mean_weighted_by_the_recipes_batch_size_passes():
    """batch_size counts tokens (unmasked positions), the loss is their mean: n₁, n₂ are tokens."""
    g = torch.Generator().manual_seed(2)
    x, mask = torch.randn(6, 5, 4, generator=g), torch.rand(6, 5, generator=g) > 0.3
    model = torch.nn.Linear(4, 1)

    def token_mean(model, batch):
        x, mask = batch
        return (model(x).squeeze(-1).pow(2) * mask).sum() / mask.sum()

    check_mean_loss(model, token_mean, (x, mask), lambda batch: int(batch[1].sum()))


@pytest.mark.parametrize("batch", [
    _data(1),  # one sample
    [torch.randn(6, 4), torch.randint(0, 3, (5,))],  # leading sizes disagree
    {"text": "no tensor at all"},
], ids=["one_sample", "mixed_leading_sizes", "no_tensor"])
def test_batches_that_cannot_be_split_are_not_checked(batch):
    calls = []

    def summed(model, batch):
        calls.append(1)
        return torch.tensor(float(len(calls)), requires_grad=True)

    check_mean_loss(_model(), summed, batch, lambda b: 1)
    assert calls == []


def test_a_model_that_refuses_half_a_batch_is_not_checked():
    def fixed_size(model, batch):
        if batch[0].shape[0] != 9:
            raise RuntimeError("this model takes batches of 9")
        return tuple_loss("sum")(model, batch)

    check_mean_loss(_model(), fixed_size, _data(), _size)


def test_the_check_leaves_modes_buffers_and_rng_alone():
    model = _model().train()
    model[2].eval()  # a mixed state to restore
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    check_mean_loss(model, tuple_loss("mean"), _data(), _size)
    assert torch.equal(torch.rand(3), expected)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_api_refuses_a_sum():
    model, batch = _model(), _data()
    with pytest.raises(BadInput, match="returns the sum over the batch"):
        curvdiag.probe(model, tuple_loss("sum"), [batch], probes="lambda_max")


def test_the_cli_refuses_a_sum_with_one_line_and_exit_2(tmp_path):
    recipe = tmp_path / "summed.py"
    recipe.write_text((RECIPES / "tiny_mlp.py").read_text() + textwrap.dedent('''

        def loss(model, batch):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")
    '''))
    result = CliRunner().invoke(app, ["probe", str(recipe), "--probes", "lambda_max"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith(f"error: recipe {recipe}: loss(model, batch) returns the sum"), lines
    assert lines[1].startswith("hint: return the mean over the batch's samples")
