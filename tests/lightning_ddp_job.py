"""Lightning with strategy="ddp_fork" on 2 CPU ranks (gloo) and curvdiag.LightningMonitor, run as
its own process by tests/test_callbacks.py (whose single-process test uses ``Tiny`` and
``loss`` from here): forking a process that already ran torch's thread
pools (the pytest process, after other tests) can hang the forked ranks, so the job forks from a
fresh interpreter on one thread. Each rank writes [step, λmax, η·λmax/T, reference] lines to
OUT/rank{r}.jsonl, the reference being one process's λmax on the union of both ranks' batches.

Usage: python tests/lightning_ddp_job.py OUT_DIR
"""
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

import curvdiag
from curvdiag.curvature.operator import CurvatureOperator
from curvdiag.probes.sharpness import lambda_max
from test_callbacks import _data, _net


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loss(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1])


def main(out: Path) -> None:
    torch.set_num_threads(1)  # before any work: the forked ranks start from a process without a thread pool
    x, y = _data()
    module, union = Tiny(), {}

    class GatherBatches(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pieces = [[torch.empty_like(t) for _ in range(2)] for t in batch]
            for gathered, t in zip(pieces, batch):
                torch.distributed.all_gather(gathered, t)
            union["batch"] = tuple(torch.cat(gathered) for gathered in pieces)

    def on_measure(step, m):  # runs in the forked ranks: results go to files
        reference = CurvatureOperator(module, [union["batch"]], loss, [32], train_mode=True)
        reference = lambda_max(reference, tol=1e-10).value
        with open(out / f"rank{torch.distributed.get_rank()}.jsonl", "a") as f:
            f.write(json.dumps([step, m.lambda_max, m.eos_ratio, reference]) + "\n")

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)
    callback = curvdiag.LightningMonitor(loss, every=2, tol=1e-8, max_hvps=200, on_measure=on_measure)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
                         callbacks=[GatherBatches(), callback], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(out))
    trainer.fit(module, loader)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
