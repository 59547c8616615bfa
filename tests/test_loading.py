"""Recipes and checkpoints: every convention of DESIGN §2.2, safe loading, clear errors."""

import os
import pickle
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from curvdiag.loading.checkpoint import load_model_state, read_checkpoint
from curvdiag.errors import BadInput
from curvdiag.loading.target import load_target
from curvdiag.loading.recipe import load_recipe
from conftest import RECIPES

TINY = str(RECIPES / "tiny_mlp.py")


def _model():
    return load_recipe(TINY).model()


@pytest.fixture
def trained(tmp_path):
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.25, momentum=0.5, nesterov=True)
    return model, opt


@pytest.mark.parametrize("layout", ["bare", "model", "model_state_dict", "state_dict", "ddp", "safetensors"])
def test_every_checkpoint_convention_loads(tmp_path, trained, layout):
    model, opt = trained
    state = model.state_dict()
    path = tmp_path / ("ckpt.safetensors" if layout == "safetensors" else "ckpt.pt")
    if layout == "bare":
        torch.save(state, path)
    elif layout == "ddp":
        torch.save({"model": {"module." + k: v for k, v in state.items()}}, path)
    elif layout == "safetensors":
        save_file(dict(state), str(path))
    else:
        torch.save({layout: state, "optimizer": opt.state_dict(), "step": 12}, path)
    fresh = _model()
    checkpoint = read_checkpoint(path)
    load_model_state(fresh, checkpoint)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k])
    if layout in ("model", "model_state_dict", "state_dict"):
        assert checkpoint.step == 12 and checkpoint.optimizer_state is not None


def test_optimizer_state_supplies_family_lr_and_momentum(tmp_path, trained):
    model, opt = trained
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    target = load_target(TINY, str(tmp_path / "c.pt"))
    assert (target.optimizer.family, target.optimizer.lr, target.optimizer.momentum) == ("nesterov", 0.25, 0.5)
    assert target.optimizer.source == "checkpoint"
    flagged = load_target(TINY, str(tmp_path / "c.pt"), lr=0.1, optimizer_family="sgd")
    assert (flagged.optimizer.family, flagged.optimizer.lr) == ("sgd", 0.1)


def test_without_optimizer_state_the_recipe_supplies_it():
    target = load_target(TINY)
    assert (target.optimizer.family, target.optimizer.lr, target.optimizer.momentum) == ("momentum", 0.5, 0.9)
    assert target.optimizer.source == "recipe"


@pytest.mark.parametrize("cls,family", [(torch.optim.Adam, "adam"), (torch.optim.AdamW, "adamw")])
def test_adam_state_supplies_bias_corrected_second_moments(tmp_path, cls, family):
    model = _model()
    opt = cls(model.parameters(), lr=1e-3, betas=(0.8, 0.99), eps=1e-6)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "a.pt")
    info = load_target(TINY, str(tmp_path / "a.pt")).optimizer
    assert info.family == family and info.betas == (0.8, 0.99) and info.step == 3
    p = info.preconditioner_diagonal()
    v = opt.state[model[0].weight]["exp_avg_sq"]
    torch.testing.assert_close(p[0], (v / (1 - 0.99 ** 3)).sqrt() + 1e-6)


def test_mismatched_checkpoint_lists_the_offending_keys(tmp_path):
    state = _model().state_dict()
    state["extra.weight"] = torch.zeros(2)
    del state["0.bias"]
    state["2.weight"] = torch.zeros(5, 6)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(BadInput) as info:
        load_model_state(_model(), read_checkpoint(tmp_path / "bad.pt"))
    message = info.value.message
    assert "missing keys: 0.bias" in message and "unexpected keys: extra.weight" in message
    assert "2.weight (5, 6) vs model (3, 6)" in message


def test_non_finite_weights_are_refused(tmp_path):
    state = _model().state_dict()
    state["0.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(BadInput, match="non-finite values.*0.weight"):
        load_model_state(_model(), read_checkpoint(tmp_path / "nan.pt"))


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['CURVDIAG_PWNED']}",))


def test_a_malicious_pickle_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CURVDIAG_PWNED", str(marker))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Exploit()}, f)
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Exploit()}, tmp_path / "evil2.pt")
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(BadInput, match="weights_only"):
            read_checkpoint(p)
    assert not marker.exists()


def test_unreadable_and_empty_checkpoints(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(BadInput, match="unreadable"):
        read_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(BadInput, match="no such file"):
        read_checkpoint(tmp_path / "absent.pt")
    torch.save({"epoch": 3}, tmp_path / "nomodel.pt")
    with pytest.raises(BadInput, match="found no model state"):
        read_checkpoint(tmp_path / "nomodel.pt")


def _write(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_recipe_errors_name_the_recipe_and_the_problem(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        load_recipe(str(tmp_path / "absent.py"))
    missing = _write(tmp_path, "missing.py", "def model():\n    return None\n")
    with pytest.raises(BadInput, match=r"missing\.py: missing required function data\(\)"):
        load_recipe(missing)
    broken = _write(tmp_path, "broken.py", "import no_such_module_anywhere\n")
    with pytest.raises(BadInput, match="importing it raised ModuleNotFoundError"):
        load_recipe(broken)
    wrong = _write(tmp_path, "wrong.py", """
        def model(): return 3
        def data(): return []
        def loss(model, batch): return 0
    """)
    with pytest.raises(BadInput, match=r"model\(\) returned int, expected a torch.nn.Module"):
        load_recipe(wrong).model()
    with pytest.raises(BadInput, match="no such file or importable module"):
        load_recipe("no.such.recipe_module")


def test_recipe_from_a_module_name(monkeypatch):
    monkeypatch.syspath_prepend(str(RECIPES))
    recipe = load_recipe("tiny_mlp")
    assert isinstance(recipe.model(), torch.nn.Module)


def test_max_batches_and_batch_sizes():
    target = load_target(TINY, max_batches=1)
    assert target.batch_sizes == [7] and len(target.batches) == 1
    assert load_target(TINY).batch_sizes == [7, 3]
    with pytest.raises(BadInput, match="max_batches=0: must be at least 1"):
        load_target(TINY, max_batches=0)
