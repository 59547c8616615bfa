"""Issue 15, item 7: property-based fuzzing of the inputs. Every mutation of a flag, a recipe or
a checkpoint drawn here is a bad input; whatever the draw, ``curvdiag train`` and ``curvdiag
probe`` end with exit 2 and one error line (plus its hint), never a traceback or "unexpected".
Derandomized and bounded (CURVDIAG_FUZZ_EXAMPLES, default 200: more than the 156 distinct draws, so
the whole space is covered in ~5 s), so the suite is deterministic."""

import os
import textwrap

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import RECIPES
from curvdiag.cli.app import app

TINY = str(RECIPES / "tiny_mlp.py")
BASE = (RECIPES / "tiny_mlp.py").read_text()
EXAMPLES = int(os.environ.get("CURVDIAG_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Values each flag refuses (train and probe share these flags).
BAD_FLAGS = {
    "--lr": ["nan", "inf", "-inf", "-1", "0", "1e400", "abc", ""],
    "--steps": ["0", "-3", "abc", "1.5"],
    "--seed": [str(2**64), str(-2**63 - 1), "abc", "1e3"],
    "--kappa": ["0", "1.5", "nan", "-1", "abc"],
    "--checkpoint-every": ["-1", "abc"],
    "--sharpness-every": ["-2", "x"],
    "--max-batches": ["0", "-1", "abc"],
    "--dist-timeout": ["inf", "nan", "0", "-5", "abc"],
}
PROBE_FLAGS = {"--lr", "--seed", "--max-batches", "--dist-timeout"}

# Replacements of one recipe function, each unusable.
BAD_FUNCTIONS = {
    "model": ["return None", "return torch.nn.Identity()", "raise RuntimeError('no gpu')", "import sys; sys.exit(0)",
              "return 3"],
    "data": ["return None", "return 5", "raise OSError('gone')", "return []",
             "return iter([(torch.randn(3, 4), torch.tensor([0, 1, 2]))] + [1 / 0])"],
    "loss": ["return None", "return 1.0", "return torch.ones(2, requires_grad=True)", "return torch.tensor(1)",
             "return F.cross_entropy(model(batch[0]), batch[1]).detach()",
             "return F.cross_entropy(model(batch[0]), batch[1]) * 1j", "raise KeyError('y')",
             "import sys; sys.exit(2)"],
    "optimizer": ["return None", "return 'sgd'", "return torch.optim.SGD(params, lr=float('nan'))",
                  "opt = torch.optim.SGD(params, lr=0.1); opt.param_groups[0]['lr'] = -1.0; return opt",
                  "opt = torch.optim.SGD(params, lr=0.1, momentum=0.5); opt.param_groups[0]['momentum'] = 2.0; return opt",
                  "opt = torch.optim.Adam(params); opt.param_groups[0]['betas'] = (1.5, 0.9); return opt"],
}
SIGNATURES = {"model": "model()", "data": "data()", "loss": "loss(model, batch)", "optimizer": "optimizer(params)"}


def _checkpoint_mutations():
    """(name, function of a {model, optimizer, step} dict) pairs, each making it unusable."""
    def set_step(value):
        return lambda c: c.update(step=value)

    def first_key(c, f):
        key = next(iter(c["model"]))
        f(c["model"], key)

    def lr(value):
        return lambda c: c["optimizer"]["param_groups"][0].update(lr=value)

    return {
        "step nan": set_step(float("nan")), "step -1": set_step(-1), "step 2.5": set_step(2.5),
        "step text": set_step("x"), "step inf": set_step(float("inf")),
        "integer key": lambda c: first_key(c, lambda m, k: m.update({7: m.pop(k)})),
        "float value": lambda c: first_key(c, lambda m, k: m.update({k: 1.0})),
        "text value": lambda c: first_key(c, lambda m, k: m.update({k: "w"})),
        "int64 weights": lambda c: first_key(c, lambda m, k: m.update({k: m[k].to(torch.int64)})),
        "uint8 weights": lambda c: first_key(c, lambda m, k: m.update({k: m[k].to(torch.uint8)})),
        "bool weights": lambda c: first_key(c, lambda m, k: m.update({k: m[k].bool()})),
        "complex weights": lambda c: first_key(c, lambda m, k: m.update({k: m[k].to(torch.complex64)})),
        "nan weights": lambda c: first_key(c, lambda m, k: m.update({k: m[k] * float("nan")})),
        "wrong shape": lambda c: first_key(c, lambda m, k: m.update({k: torch.zeros(2, 2)})),
        "missing key": lambda c: first_key(c, lambda m, k: m.pop(k)),
        "lr nan": lr(float("nan")), "lr -1": lr(-1.0), "lr inf": lr(float("inf")),
        "momentum 1.5": lambda c: c["optimizer"]["param_groups"][0].update(momentum=1.5),
        "params text": lambda c: c["optimizer"]["param_groups"][0].update(params="x"),
        "no groups": lambda c: c["optimizer"].update(param_groups=[]),
    }


CHECKPOINT_MUTATIONS = _checkpoint_mutations()


def _checkpoint(tmp_path, mutation):
    import importlib.util
    spec = importlib.util.spec_from_file_location("tiny_for_fuzz", TINY)
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    model = tiny.model()
    content = {"model": model.state_dict(), "optimizer": tiny.optimizer(model.parameters()).state_dict(), "step": 3}
    CHECKPOINT_MUTATIONS[mutation](content)
    path = tmp_path / "mutated.pt"
    torch.save(content, path)
    return path


def _recipe(tmp_path, function, body):
    path = tmp_path / "mutated_recipe.py"
    path.write_text(BASE + "\n\n" + textwrap.dedent(f"""
        def {SIGNATURES[function]}:
            {body}
        """))
    return path


INPUTS = st.one_of(
    st.tuples(st.just("flag"), st.sampled_from(sorted(BAD_FLAGS))).flatmap(
        lambda t: st.tuples(st.just(t[0]), st.just(t[1]), st.sampled_from(BAD_FLAGS[t[1]]))),
    st.tuples(st.just("recipe"), st.sampled_from(sorted(BAD_FUNCTIONS))).flatmap(
        lambda t: st.tuples(st.just(t[0]), st.just(t[1]), st.sampled_from(BAD_FUNCTIONS[t[1]]))),
    st.tuples(st.just("checkpoint"), st.sampled_from(sorted(CHECKPOINT_MUTATIONS)), st.just(None)),
)


@FUZZ
@given(bad=INPUTS, command=st.sampled_from(["train", "probe"]))
def test_every_mutated_input_ends_with_exit_2_and_one_line(tmp_path_factory, bad, command):
    kind, what, value = bad
    tmp_path = tmp_path_factory.mktemp("fuzz")
    if kind == "flag" and command == "probe" and what not in PROBE_FLAGS:
        command = "train"
    args = [command, str(_recipe(tmp_path, what, value)) if kind == "recipe" else TINY]
    args += ["--steps", "2", "-q", "--out", str(tmp_path / "run")] if command == "train" else ["--probes", "lambda_max"]
    if kind == "flag":
        args += [f"{what}={value}"]  # last: it overrides the defaults above
    elif kind == "checkpoint":
        args += ["--checkpoint", str(_checkpoint(tmp_path, what))]
    result = CliRunner().invoke(app, args)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert len(errors) == 1 and "unexpected" not in errors[0], (args, result.output)
    assert all(line.startswith(("error:", "hint:")) for line in result.output.splitlines() if line.strip()), result.output
