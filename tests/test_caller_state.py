"""Issue 15, item 6: probing leaves the caller's state alone. A loss.backward() the caller has
pending still runs afterwards (no parameter's version counter moved), every ``.grad`` is the
same tensor object with the same values, and the weights and buffers are bit-identical; for
every probe, through the Python API, in eval and in train mode."""

import pytest
import torch
import torch.nn.functional as F

import curvdiag
from curvdiag.probes.registry import PROBE_NAMES


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def loss(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    loss(model, batches[0]).backward()  # .grad tensors exist, and the optimizer has momentum state
    optimizer.step()
    return model, loss, batches, optimizer


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("name", PROBE_NAMES)
def test_a_probe_leaves_pending_graphs_grads_weights_and_buffers_alone(name, train_mode):
    model, loss, batches, optimizer = _setup()
    model.train()
    pending = loss(model, batches[1])  # the caller's graph, backward not yet called
    grads = [p.grad for p in model.parameters()]
    grad_values = [g.clone() for g in grads]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    versions = [p._version for p in model.parameters()]

    report = curvdiag.probe(model, loss, batches, probes=[name], optimizer=optimizer, train_mode=train_mode,
                            samples=4, max_hvps=40, glass_samples=3)
    assert name in report.probes

    assert [p._version for p in model.parameters()] == versions
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))  # the same objects (DDP bucket views)
    assert all(torch.equal(p.grad, v) for p, v in zip(model.parameters(), grad_values))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.training  # the caller's mode
    pending.backward()  # still usable: it adds ∇L_1 at the caller's weights to every .grad
    reference = _setup()[0]
    reference.load_state_dict(state)
    reference.train()
    expected = torch.autograd.grad(loss(reference, batches[1]), list(reference.parameters()))
    for p, before, g in zip(model.parameters(), grad_values, expected):
        torch.testing.assert_close(p.grad, before + g, rtol=1e-12, atol=1e-12)


def test_snapshot_is_a_deepcopy_of_a_state_that_later_steps_cannot_reach(tmp_path):
    """The training loop's per-step copy of model, optimizer and scheduler state: the same values
    and structure as copy.deepcopy (tied weights sharing one tensor, the state dict's _metadata),
    independent of the live tensors, and no larger on disk."""
    import copy

    from curvdiag.model_state import snapshot

    torch.manual_seed(0)
    embed = torch.nn.Embedding(7, 4)
    head = torch.nn.Linear(4, 7, bias=False)
    head.weight = embed.weight  # tied
    model = torch.nn.Sequential(embed, torch.nn.Flatten(), torch.nn.BatchNorm1d(12), torch.nn.Linear(12, 7), head)
    model[3] = torch.nn.Linear(12, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 3)
    x = torch.randint(0, 7, (5, 3))
    for _ in range(2):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
        scheduler.step()
    for state in (model.state_dict(), optimizer.state_dict(), scheduler.state_dict()):
        fast, slow = snapshot(state), copy.deepcopy(state)
        assert type(fast) is type(slow) and getattr(fast, "_metadata", None) == getattr(slow, "_metadata", None)
        torch.save(fast, tmp_path / "fast.pt")
        torch.save(slow, tmp_path / "slow.pt")
        assert (tmp_path / "fast.pt").stat().st_size <= (tmp_path / "slow.pt").stat().st_size
        assert torch.load(tmp_path / "fast.pt", weights_only=True).__repr__() == slow.__repr__()
    saved = snapshot(model.state_dict())
    assert saved["0.weight"].data_ptr() == saved["4.weight"].data_ptr()  # tied: one tensor, as deepcopy
    before = {k: v.clone() for k, v in saved.items()}
    optimizer.zero_grad()
    model(x).sum().backward()
    optimizer.step()  # in place on the live tensors
    assert all(torch.equal(saved[k], before[k]) for k in saved)
    assert not torch.equal(model.state_dict()["3.weight"], saved["3.weight"])
