"""The two newer failing cases of sample_models/ (issue 14): they load as recipes and do what their
docstrings say at the recipe's learning rate — the schedule case diverges during its warm-up, the
transformer ends its first 60 steps near the uniform-prediction loss where a tuned lr is far below."""

import math

import pytest
import torch

from conftest import SAMPLES
from curvdiag.loading.recipe import load_recipe
from curvdiag.train.loop import Trainer, TrainSettings


def _parameters(recipe):
    return sum(p.numel() for p in recipe.model().parameters())


def test_the_schedule_case_warms_up_then_decays_and_diverges_at_step_12(tmp_path):
    recipe = load_recipe(str(SAMPLES / "diverge_schedule.py"))
    assert _parameters(recipe) == 26_122 and [len(y) for _, y in recipe.data()] == [250] * 4
    optimizer = recipe.optimizer(recipe.model().parameters())
    scheduler = recipe._call("scheduler", optimizer)  # as the Trainer builds it
    rates = []
    for _ in range(301):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = 20.0
    assert rates[0] == pytest.approx(peak / 30) and rates[29] == pytest.approx(peak)
    assert rates[30] == pytest.approx(peak) and rates[165] == pytest.approx(peak / 2)
    assert rates[300] == pytest.approx(0.0, abs=1e-12) and max(rates) == pytest.approx(peak)
    summary = Trainer(str(SAMPLES / "diverge_schedule.py"), None, tmp_path / "none",
                      TrainSettings(steps=40, checkpoint_every=0)).run()
    assert summary.diverged and summary.steps_completed == 12


def test_the_transformer_case_fails_at_its_lr_and_trains_at_the_tuned_one(tmp_path):
    recipe = load_recipe(str(SAMPLES / "diverge_transformer.py"))
    assert _parameters(recipe) == 26_346 and [tuple(x.shape) for x, _ in recipe.data()] == [(250, 8, 8)] * 4
    assert isinstance(recipe.optimizer(recipe.model().parameters()), torch.optim.AdamW)
    path = str(SAMPLES / "diverge_transformer.py")
    failing = Trainer(path, None, tmp_path / "fail", TrainSettings(steps=60, checkpoint_every=0)).run()
    tuned = Trainer(path, None, tmp_path / "tuned", TrainSettings(steps=60, lr=0.02, checkpoint_every=0)).run()
    # The last batch's loss at step 59 (seed 0): 2.30 at lr 0.1 (ln 10 = 2.303, a uniform prediction), 0.23 at lr 0.02.
    assert not failing.diverged and failing.final_loss > 0.5 * math.log(10)
    assert not tuned.diverged and tuned.final_loss < 0.2 * failing.final_loss
