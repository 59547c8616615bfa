"""The Lightning and Hugging Face callbacks, each with its real framework on a tiny CPU model:
what they log is the monitor's numbers of the same run, and for Lightning (SGD, no shuffling)
the same λmax as a Monitor in a hand-written loop over the same batches."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F

import curvdiag


def _data():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(128, 6, generator=generator), torch.randint(0, 3, (128,), generator=generator)


def _net():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def test_lightning_callback_logs_the_monitors_lambda_max(tmp_path):
    pl = pytest.importorskip("lightning.pytorch", reason="pip install curvdiag[lightning]")
    from lightning.pytorch.loggers import CSVLogger
    from lightning_ddp_job import Tiny, loss

    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=False)
    callback = curvdiag.LightningMonitor(loss, every=3, tol=1e-3)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path), callbacks=[callback],
                         log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Tiny(), loader)
    measured = callback.monitor.measurements
    assert [m.step for m in measured] == [0, 3, 6] and callback.monitor.steps == 8
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("curvdiag/lambda_max")]
    assert [int(r["step"]) for r in rows] == [0, 3, 6]  # logged once, at the measured steps
    assert [float(r["curvdiag/lambda_max"]) for r in rows] == pytest.approx([m.lambda_max for m in measured], rel=1e-6)
    assert [float(r["curvdiag/eos_ratio"]) for r in rows] == pytest.approx([m.eos_ratio for m in measured], rel=1e-6)

    # The same training by hand (SGD, the same batches in order): the same λmax at the same steps.
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    by_hand = curvdiag.Monitor(model, loss, opt, every=3, tol=1e-3)
    for batch in list(loader) * 2:
        opt.zero_grad()
        loss(model, batch).backward()
        opt.step()
        by_hand.step(batch)
    assert [m.lambda_max for m in by_hand.measurements] == pytest.approx([m.lambda_max for m in measured], rel=1e-5)


def test_lightning_callback_under_ddp_gives_every_rank_the_union_s_curvature(tmp_path):
    """strategy="ddp_fork", 2 CPU ranks (gloo): each rank's Monitor sums the curvature over the
    ranks, so both log the same λmax, and it is one process's on the union of the two ranks'
    batches (gathered by a callback that runs before the monitor's). The job runs in a fresh
    interpreter (tests/lightning_ddp_job.py): forking this process, whose thread pools other tests
    have started, can hang the forked ranks."""
    pytest.importorskip("lightning.pytorch", reason="pip install curvdiag[lightning]")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    job = Path(__file__).with_name("lightning_ddp_job.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(job), str(tmp_path)], capture_output=True, text=True, timeout=180,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [[json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in range(2)]
    assert ranks[0] == ranks[1] and [row[0] for row in ranks[0]] == [0, 2]  # 4 steps of 2 × 16 samples
    for step, value, ratio, reference in ranks[0]:
        assert value == pytest.approx(reference, rel=1e-5) and ratio == pytest.approx(0.1 * value / 2.0)


class _HFTiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_huggingface_callback_logs_the_monitors_lambda_max(tmp_path):
    pytest.importorskip("transformers", reason="pip install curvdiag[huggingface]")
    pytest.importorskip("accelerate", reason="pip install curvdiag[huggingface]")
    from transformers import Trainer, TrainingArguments

    x, y = _data()
    dataset = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    held = {"x": x[:64], "labels": y[:64]}
    seen = []
    callback = curvdiag.HuggingFaceMonitor([held], every=2, on_measure=lambda step, m: seen.append(step))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=32, max_steps=6,
                             learning_rate=0.01, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", seed=0, disable_tqdm=True)
    Trainer(model=_HFTiny(), args=args, train_dataset=dataset, callbacks=[callback]).train()
    measured = callback.monitor.measurements
    assert seen == [m.step for m in measured] == [0, 2, 4] and callback.monitor.steps == 6
    assert all(m.batch == "held" and m.preconditioned and m.lambda_max > 0 for m in measured)  # AdamW
    assert all(m.directional_curvature is None or math.isfinite(m.directional_curvature) for m in measured)
    logged = [e for e in callback._state.log_history if "curvdiag/lambda_max" in e]
    assert [e["step"] for e in logged] == [1, 3, 5]
    assert [e["curvdiag/lambda_max"] for e in logged] == [m.lambda_max for m in measured]
    assert [e["curvdiag/eos_ratio"] for e in logged] == [m.eos_ratio for m in measured]
