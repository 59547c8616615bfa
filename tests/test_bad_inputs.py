"""Issue 15, items 4–5: every input-caused failure ends as exit 2 and one error line (no
traceback, no "unexpected"), and no bad input gives numbers silently. One case per failure."""

import textwrap

import pytest
import torch
from typer.testing import CliRunner

from conftest import RECIPES
from curvdiag.cli.app import app

TINY = str(RECIPES / "tiny_mlp.py")
BASE = (RECIPES / "tiny_mlp.py").read_text()

# name: (the recipe's replaced or added code, or None for tiny_mlp itself)
RECIPE_CHANGES = {
    "nan_lr": "def optimizer(params):\n    return torch.optim.SGD(params, lr=float('nan'))\n",
    "negative_lr_group": "def optimizer(params):\n    opt = torch.optim.SGD(params, lr=0.1)\n"
                         "    opt.param_groups[0]['lr'] = -0.5\n    return opt\n",
    "nan_beta": "def optimizer(params):\n    opt = torch.optim.Adam(params, lr=0.01)\n"
                "    opt.param_groups[0]['betas'] = (float('nan'), 0.999)\n    return opt\n",
    "detached": "def loss(model, batch):\n    x, y = batch\n    return F.cross_entropy(model(x), y).detach()\n",
    "complex": "def loss(model, batch):\n    x, y = batch\n    return F.cross_entropy(model(x), y) * (1 + 1j)\n",
    "data_raises": "def data():\n    x = torch.randn(10, 4); y = torch.randint(0, 3, (10,))\n    class D:\n"
                   "        def __iter__(self):\n            yield (x[:5], y[:5])\n            raise ValueError('disk gone')\n"
                   "    return D()\n",
    "data_exits": "def data():\n    x = torch.randn(10, 4); y = torch.randint(0, 3, (10,))\n    class D:\n"
                  "        def __iter__(self):\n            yield (x[:5], y[:5])\n            import sys; sys.exit(4)\n"
                  "    return D()\n",
    "backward_raises": "class Bad(torch.autograd.Function):\n    @staticmethod\n    def forward(ctx, x):\n"
                       "        return x.clone()\n    @staticmethod\n    def backward(ctx, g):\n"
                       "        raise ValueError('no backward')\n\n\ndef loss(model, batch):\n    x, y = batch\n"
                       "    return Bad.apply(F.cross_entropy(model(x), y))\n",
    "not_a_scheduler": "def scheduler(opt):\n    return 5\n",
    "nan_scheduler": "def scheduler(opt):\n    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: float('nan') if e >= 2 else 1.0)\n",
    "model_exits": "def model():\n    import sys; sys.exit(3)\n",
    "import_exits": "import sys\nsys.exit('bye')\n",
    "loss_raises_midway": "calls = []\n\n\ndef loss(model, batch):\n    calls.append(1)\n    if len(calls) > 3:\n"
                          "        raise KeyError('label')\n    x, y = batch\n    return F.cross_entropy(model(x), y)\n",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The recipes above and the malformed checkpoints, written once."""
    root = tmp_path_factory.mktemp("bad")
    out = {name: root / f"{name}.py" for name in RECIPE_CHANGES}
    for name, change in RECIPE_CHANGES.items():
        out[name].write_text(BASE + "\n\n" + textwrap.dedent(change))
    import importlib.util
    spec = importlib.util.spec_from_file_location("tiny_for_bad_inputs", TINY)
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    model = tiny.model()
    state = model.state_dict()
    optimizer = tiny.optimizer(model.parameters())

    def save(name, obj):
        out[name] = root / f"{name}.pt"
        torch.save(obj, out[name])

    save("int64_weights", {k: v.to(torch.int64) for k, v in state.items()})
    save("uint8_weights", {k: v.to(torch.uint8) for k, v in state.items()})
    save("bool_weights", {k: v.bool() for k, v in state.items()})
    save("complex_weights", {k: v.to(torch.complex64) for k, v in state.items()})
    save("nan_step", {"model": state, "step": float("nan")})
    save("fractional_step", {"model": state, "step": 2.5})
    save("integer_keys", {"model": {i: v for i, v in enumerate(state.values())}})
    save("non_tensor_values", {"model": {k: 1.0 for k in state}})
    opt = optimizer.state_dict()
    opt["param_groups"][0]["lr"] = float("nan")
    save("nan_lr_in_checkpoint", {"model": state, "optimizer": opt})
    opt = optimizer.state_dict()
    opt["param_groups"][0]["momentum"] = -1.0
    save("negative_momentum_in_checkpoint", {"model": state, "optimizer": opt})
    opt = optimizer.state_dict()
    opt["param_groups"] = [{"params": "x"}]
    save("broken_optimizer_state", {"model": state, "optimizer": opt})
    out["root"] = root
    return out


def _train(files, recipe, *flags):
    return ["train", str(files[recipe]) if recipe in files else recipe, "--steps", "4", "-q",
            "--out", str(files["root"] / "runs" / recipe.replace("/", "_")), *flags]


# name: (command line from the files, what the error line says)
CASES = {
    "train_nan_lr_from_the_recipe": (lambda f: _train(f, "nan_lr"), "lr=nan, expected a finite number ≥ 0"),
    "probe_nan_lr_from_the_recipe": (lambda f: ["probe", str(f["nan_lr"])], "lr=nan"),
    "probe_negative_lr_from_the_recipe": (lambda f: ["probe", str(f["negative_lr_group"])], "lr=-0.5"),
    "probe_nan_beta_from_the_recipe": (lambda f: ["probe", str(f["nan_beta"])], "betas[0]=nan"),
    "train_lr_inf": (lambda f: _train(f, TINY, "--lr", "inf"), "--lr inf: must be a positive finite number"),
    "train_lr_nan": (lambda f: _train(f, TINY, "--lr", "nan"), "--lr nan: must be a positive finite number"),
    "train_engage_unknown": (lambda f: _train(f, TINY, "--controller", "throttle", "--engage", "sometimes"),
                             "--engage sometimes: unknown"),
    "probe_lr_inf": (lambda f: ["probe", TINY, "--lr", "inf"], "--lr inf: the learning rate must be a positive finite"),
    "train_lr_1e308_with_newton": (lambda f: _train(f, TINY, "--lr", "1e308", "--controller", "newton"),
                                   "the update overflows"),
    "train_detached_loss": (lambda f: _train(f, "detached"), "does not depend on the trainable parameters"),
    "probe_detached_loss_lambda_max": (lambda f: ["probe", str(f["detached"]), "--probes", "lambda_max"],
                                       "does not depend on the trainable parameters"),
    "train_complex_loss": (lambda f: _train(f, "complex"), "returned a complex64 tensor"),
    "probe_complex_loss": (lambda f: ["probe", str(f["complex"]), "--probes", "lambda_max"], "complex64"),
    "train_data_raises_midway": (lambda f: _train(f, "data_raises"), "iterating data() raised ValueError: disk gone"),
    "probe_data_raises_midway": (lambda f: ["probe", str(f["data_raises"])], "iterating data() raised ValueError"),
    "train_data_calls_sys_exit": (lambda f: _train(f, "data_exits"), "iterating data() raised sys.exit(4)"),
    "train_backward_raises": (lambda f: _train(f, "backward_raises"), "the loss's backward raised ValueError: no backward"),
    "probe_backward_raises": (lambda f: ["probe", str(f["backward_raises"]), "--probes", "lambda_max"],
                              "the loss's backward raised ValueError"),
    "train_loss_raises_midway": (lambda f: _train(f, "loss_raises_midway"), "loss() raised KeyError"),
    "train_scheduler_not_a_scheduler": (lambda f: _train(f, "not_a_scheduler"), "scheduler(optimizer) returned int"),
    "train_scheduler_sets_nan": (lambda f: _train(f, "nan_scheduler"), "at step 2 the scheduler set"),
    "train_model_calls_sys_exit": (lambda f: _train(f, "model_exits"), "model() called sys.exit(3)"),
    "probe_import_calls_sys_exit": (lambda f: ["probe", str(f["import_exits"])], "importing it called sys.exit('bye')"),
    "probe_int64_weights": (lambda f: ["probe", TINY, "-c", str(f["int64_weights"])], "weights of the wrong type"),
    "probe_uint8_weights": (lambda f: ["probe", TINY, "-c", str(f["uint8_weights"])], "uint8 vs model float32"),
    "probe_bool_weights": (lambda f: ["probe", TINY, "-c", str(f["bool_weights"])], "bool vs model float32"),
    "train_complex_weights": (lambda f: _train(f, TINY, "-c", str(f["complex_weights"])), "complex64 vs model float32"),
    "probe_nan_step": (lambda f: ["probe", TINY, "-c", str(f["nan_step"])], "malformed step nan"),
    "train_fractional_step": (lambda f: _train(f, TINY, "-c", str(f["fractional_step"])), "malformed step 2.5"),
    "probe_integer_keys": (lambda f: ["probe", TINY, "-c", str(f["integer_keys"])], "key 0 is not a parameter name"),
    "probe_non_tensor_values": (lambda f: ["probe", TINY, "-c", str(f["non_tensor_values"])], "holds a float"),
    "probe_nan_lr_in_checkpoint": (lambda f: ["probe", TINY, "-c", str(f["nan_lr_in_checkpoint"])], "lr=nan"),
    "train_nan_lr_in_checkpoint": (lambda f: _train(f, TINY, "-c", str(f["nan_lr_in_checkpoint"])), "lr=nan"),
    "train_negative_momentum_in_checkpoint": (lambda f: _train(f, TINY, "-c", str(f["negative_momentum_in_checkpoint"])),
                                              "momentum=-1.0, expected in [0, 1)"),
    "train_broken_optimizer_state": (lambda f: _train(f, TINY, "-c", str(f["broken_optimizer_state"])),
                                     "its optimizer state does not fit"),
    "probe_broken_optimizer_state": (lambda f: ["probe", TINY, "-c", str(f["broken_optimizer_state"])],
                                     "expected a list of parameter indices"),
    "train_seed_beyond_64_bits": (lambda f: _train(f, TINY, "--seed", str(2**64)), "--seed 18446744073709551616"),
    "probe_seed_beyond_64_bits": (lambda f: ["probe", TINY, "--seed", str(2**64)], "must fit in 64 bits"),
    "probe_seed_below_64_bits": (lambda f: ["probe", TINY, "--seed", str(-2**63 - 1)], "must fit in 64 bits"),
    "probe_device_meta": (lambda f: ["probe", TINY, "--device", "meta"], "--device meta: unsupported device"),
    "probe_device_mps": (lambda f: ["probe", TINY, "--device", "mps"], "--device mps: unsupported device"),
    "probe_device_xla": (lambda f: ["probe", TINY, "--device", "xla"], "--device xla: unsupported device"),
    "train_dist_timeout_inf_under_nproc": (lambda f: _train(f, TINY, "--nproc", "2", "--dist-timeout", "inf"),
                                           "--dist-timeout inf: must be a positive finite number"),
    "train_out_under_a_file": (lambda f: ["train", TINY, "--steps", "2", "--out", str(f["nan_lr"]) + "/run"],
                               "--out"),
    "train_steps_not_a_number": (lambda f: ["train", TINY, "--steps", "abc"], "'--steps'"),
    "probe_samples_not_a_number": (lambda f: ["probe", TINY, "--samples", "1.5x"], "'--samples'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_input_is_one_line_and_exit_2(files, case):
    command, says = CASES[case]
    result = CliRunner().invoke(app, command(files))
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and says in errors[0], result.output
    assert "unexpected" not in result.output and "Traceback" not in result.output
    others = [line for line in result.output.splitlines()
              if line.strip() and not line.startswith(("error:", "hint:"))]
    assert others == [], result.output  # nothing but the line and its hint


def test_markup_in_a_layer_name_and_in_out_is_printed_as_text(tmp_path):
    recipe = tmp_path / "markup.py"
    recipe.write_text(BASE + textwrap.dedent('''

        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.add_module("[/bold]", torch.nn.Linear(4, 3))

            def forward(self, x):
                return getattr(self, "[/bold]")(x)


        def model():
            torch.manual_seed(0)
            return M()
        '''))
    probe = CliRunner().invoke(app, ["probe", str(recipe), "--probes", "lambda_max,hessian_trace"])
    assert probe.exit_code == 0, probe.output
    assert "[/bold].weight" in probe.output
    out = tmp_path / "[/bold]run"
    train = CliRunner().invoke(app, ["train", TINY, "--steps", "2", "--out", str(out)], env={"COLUMNS": "400"})
    assert train.exit_code == 0, train.output
    assert str(out) in train.output
