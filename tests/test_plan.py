"""The restore plan: one decision that ``compare``, the browser and ``restore`` share, carried
out as one transaction (all or nothing, Ctrl-C included, one restore at a time per target)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MLP, Wider, assert_same_arrays, make_mlp, save_checkpoint, snapshot
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import nnx_ckpt_widgets as ncw
from nnx_ckpt_widgets._restore_panel import RestorePanel

HERE = Path(__file__).parent


class Narrower(nnx.Module):
    """Only the MLP's first layer: 2 unexpected keys."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(3, 4, rngs=rngs)


class Other(nnx.Module):
    """Nothing in common with the MLP."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.head = nnx.Linear(3, 4, rngs=rngs)


TARGETS = {
    "same": lambda: MLP(rngs=nnx.Rngs(1)),
    "missing": lambda: Wider(rngs=nnx.Rngs(1)),
    "unexpected": lambda: Narrower(rngs=nnx.Rngs(1)),
    "dtype": lambda: MLP(rngs=nnx.Rngs(1), dtype=jnp.bfloat16),
    "shape": lambda: MLP(din=5, rngs=nnx.Rngs(1)),
    "nothing": lambda: Other(rngs=nnx.Rngs(1)),
}


@pytest.fixture(scope="module")
def mlp_ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("plan") / "mlp", nnx.state(make_mlp(0)))


# --- the plan as a value ---------------------------------------------------------------------


def test_plan_says_what_each_key_gets(mlp_ckpt):
    report = ncw.compare(mlp_ckpt, Wider(rngs=nnx.Rngs(1)))
    plan = report.plan(strict=False, missing="zeros")
    assert plan.ok and plan.read_arrays == 4 and plan.read_bytes == 104
    actions = {key.key: key.action for key in plan.keys}
    assert actions == {
        "linear1/bias": "restored",
        "linear1/kernel": "restored",
        "linear2/bias": "restored",
        "linear2/kernel": "restored",
        "extra/bias": "zeros",
        "extra/kernel": "zeros",
    }
    assert {k.key: k.sources for k in plan.keys}["linear1/kernel"] == ("linear1/kernel",)
    assert str(plan) == "Ready to restore 4 arrays (104 B) and zero-fill 2."
    strict = report.plan()
    assert not strict.ok and strict.keys == () and strict.read_bytes == 0
    assert strict.refusal is not None and "strict=False" in strict.refusal.fix
    assert "lenient" in strict.refusal.controls and "strict=False" not in strict.refusal.controls
    assert {k["action"] for k in json.loads(json.dumps(plan.as_dict()))["keys"]} == {
        "restored",
        "zeros",
    }


def test_refusal_names_only_what_applies(mlp_ckpt):
    """A missing-only difference does not suggest rename= or cast=True."""
    plan = ncw.compare(mlp_ckpt, Wider(rngs=nnx.Rngs(1))).plan()
    assert plan.refusal is not None
    assert "rename" not in plan.refusal.fix and "cast" not in plan.refusal.fix
    assert "cast" not in plan.refusal.controls
    dtype = ncw.compare(mlp_ckpt, TARGETS["dtype"]()).plan(strict=False)
    assert dtype.refusal is not None and "cast=True" in dtype.refusal.fix
    assert "'cast dtypes'" in dtype.refusal.controls


def test_nothing_matches_is_refused_and_the_model_is_unchanged(mlp_ckpt):
    """A lenient restore that would read nothing used to report success ("Restored 0 arrays")."""
    model = Other(rngs=nnx.Rngs(1))
    before = snapshot(model)
    with pytest.raises(ncw.CheckpointMismatchError, match="nothing in this checkpoint matches"):
        ncw.restore(mlp_ckpt, model, strict=False)
    assert_same_arrays(before, model)
    browser = ncw.CheckpointBrowser(mlp_ckpt, model)
    assert browser.panel.phase == "warn"
    assert "Nothing in this checkpoint matches the model" in browser.status
    browser.panel.mode.value = False
    assert browser.panel.phase == "warn"
    browser.restore_button.click()
    assert browser.wait(60) is None and browser.status.startswith("Restore failed: ")
    assert_same_arrays(before, model)


def test_plan_for_another_target_is_refused(mlp_ckpt):
    plan = ncw.compare(mlp_ckpt, MLP(rngs=nnx.Rngs(1))).plan()
    other = MLP(din=5, rngs=nnx.Rngs(2))
    before = snapshot(other)
    with pytest.raises(ncw.InvalidArgumentError, match="made for another target"):
        ncw.apply_plan(plan, other)
    assert_same_arrays(before, other)
    same_shape = MLP(rngs=nnx.Rngs(3))
    ncw.apply_plan(plan, same_shape)  # same keys, shapes and dtypes: the plan holds
    assert_same_arrays(make_mlp(0), same_shape)


def test_abstract_target_with_missing_keep_is_refused_by_panel_and_restore(mlp_ckpt):
    """The panel once said "Ready to restore 4 arrays ... and keep 2" and the click failed."""
    target = nnx.eval_shape(lambda: Wider(rngs=nnx.Rngs(1)))
    panel = RestorePanel(ncw.inspect(mlp_ckpt), target)
    panel.mode.value = False
    assert panel.phase == "warn" and "abstract" in panel.status
    assert "missing: zeros" in panel.status
    with pytest.raises(ncw.CheckpointMismatchError, match="abstract"):
        ncw.restore(mlp_ckpt, target, strict=False)


def test_load_returns_its_report(mlp_ckpt):
    model, report = ncw.load(
        mlp_ckpt,
        lambda: MLP(rngs=nnx.Rngs(1), dtype=jnp.bfloat16),
        cast=True,
        return_report=True,
    )
    assert isinstance(report, ncw.LoadReport)
    assert len(report.casts) == 4 and {e.action for e in report.entries} == {"cast"}
    assert model.linear1.kernel[...].dtype == jnp.bfloat16


def test_load_initialises_missing_keys_of_its_abstract_model(mlp_ckpt):
    model, report = ncw.load(
        mlp_ckpt, lambda: Wider(rngs=nnx.Rngs(1)), strict=False, return_report=True
    )
    fresh = Wider(rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(model.extra.kernel[...], fresh.extra.kernel[...])
    assert report.action_counts["kept"] == 2


# --- errors that say what happened -----------------------------------------------------------


def test_a_raising_transform_is_a_transform_error(mlp_ckpt):
    model = MLP(rngs=nnx.Rngs(1))
    before = snapshot(model)

    def boom(x):
        raise RuntimeError("bug in my function")

    with pytest.raises(ncw.TransformError, match="bug in my function") as raised:
        ncw.restore(mlp_ckpt, model, transform={"kernel$": boom})
    assert not isinstance(raised.value, ncw.CorruptCheckpointError)
    assert_same_arrays(before, model)


class Refusing(nnx.Param):
    """A Variable whose ``set_value`` refuses values once ``armed``: a target problem."""

    armed = False

    def set_value(self, value, **kwargs):
        if Refusing.armed:
            raise ValueError("this variable is read-only")
        return super().set_value(value, **kwargs)


class HalfRefusing(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(3, 4, rngs=rngs)
        self.linear2 = nnx.Linear(4, 2, rngs=rngs)
        self.linear2.kernel = Refusing(self.linear2.kernel[...])


def test_a_failing_set_value_puts_every_value_back(mlp_ckpt):
    """Values are set one by one; the one that fails must not leave the others new."""
    model = HalfRefusing(rngs=nnx.Rngs(1))
    before = snapshot(model)
    Refusing.armed = True
    try:
        with pytest.raises(ncw.TargetError, match="every value was put back") as raised:
            ncw.restore(mlp_ckpt, model)
    finally:
        Refusing.armed = False
    assert isinstance(raised.value.__cause__, ValueError)
    assert_same_arrays(before, model)


# --- the panel and restore agree -------------------------------------------------------------

COMBOS = list(itertools.product(TARGETS, (False, True), (True, False), *[(0, 1)] * 3))


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(combo=st.sampled_from(COMBOS))
def test_panel_status_and_restore_agree(mlp_ckpt, combo):
    """Every combination of target kind, abstract target, strict, missing, unexpected and cast:
    the panel says Ready exactly when restore succeeds."""
    kind, abstract, strict, zeros, error, cast = combo
    factory = TARGETS[kind]
    options = {
        "strict": strict,
        "missing": "zeros" if zeros else "keep",
        "unexpected": "error" if error else "ignore",
        "cast": bool(cast),
    }
    if strict:  # the panel's strict mode is restore's defaults: no lenient option applies
        options.update(missing="keep", unexpected="ignore", cast=False)
    panel_target = nnx.eval_shape(factory) if abstract else factory()
    panel = RestorePanel(ncw.inspect(mlp_ckpt), panel_target)
    panel.mode.value = strict
    if not strict:
        panel.missing.value, panel.unexpected.value = options["missing"], options["unexpected"]
        panel.cast.value = options["cast"]
    assert panel.options() == options
    target = nnx.eval_shape(factory) if abstract else factory()
    before = None if abstract else snapshot(target)
    try:
        ncw.restore(mlp_ckpt, target, **options)
    except ncw.CheckpointMismatchError:
        assert panel.phase == "warn", (combo, panel.status)
        if before is not None:
            assert_same_arrays(before, target)
    else:
        assert panel.phase == "ready", (combo, panel.status)
        panel.button.click()
        assert panel.wait(60) is not None, panel.status


# --- one transaction -------------------------------------------------------------------------


def test_sigint_never_leaves_a_half_restored_model(tmp_path):
    """Real SIGINTs at random moments across 50 restores of 3,000 arrays: each try leaves the
    model all old (interrupted before the commit) or all new, never a mix."""
    run = subprocess.run(
        [sys.executable, str(HERE / "sigint_restore.py"), str(tmp_path), "50", "7"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    tries = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(tries) == 50
    for outcome in tries:
        assert (outcome["new"], outcome["old"]) in ((3000, 0), (0, 3000)), outcome
    interrupted = [t for t in tries if t["interrupted"]]
    # The signals really landed, before and after commits.
    assert len(interrupted) >= 25
    assert any(t["new"] == 3000 for t in interrupted) and any(t["old"] == 3000 for t in tries)


class Many(nnx.Module):
    def __init__(self, n: int, value: float):
        self.ws = nnx.List([nnx.Param(jnp.full((4,), value, jnp.float32)) for _ in range(n)])


def test_two_threads_restoring_one_model_give_all_of_one(tmp_path):
    n = 800
    paths = []
    for value in (1.0, 2.0):
        path = tmp_path / f"v{value:g}.safetensors"
        save_file({f"ws.{i}": np.full((4,), value, np.float32) for i in range(n)}, path)
        paths.append(path)
    for _ in range(8):
        model = Many(n, 0.0)
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def run(
            path: Path,
            model: Many = model,
            barrier: threading.Barrier = barrier,
            errors: list[BaseException] = errors,
        ) -> None:
            barrier.wait()
            try:
                ncw.restore(path, model)
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=run, args=(p,)) for p in paths]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors
        values = {float(np.asarray(w[...])[0]) for w in model.ws}
        assert values in ({1.0}, {2.0}), values


def _distinct_combos() -> list[tuple]:
    """Every (target kind, abstract, options) the panel can show: its strict mode is one set of
    options (the lenient controls are disabled there), lenient is each of 8."""
    lenient = [
        {"strict": False, "missing": m, "unexpected": u, "cast": c}
        for m in ("keep", "zeros")
        for u in ("ignore", "error")
        for c in (False, True)
    ]
    strict = [{"strict": True, "missing": "keep", "unexpected": "ignore", "cast": False}]
    return [(k, a, o) for k in TARGETS for a in (False, True) for o in strict + lenient]


def test_panel_and_restore_agree_on_every_combination(mlp_ckpt):
    """The exhaustive companion of the property test above: all 108 combinations."""
    info = ncw.inspect(mlp_ckpt)
    combos = _distinct_combos()
    assert len(combos) == 108
    for kind, abstract, options in combos:
        factory = TARGETS[kind]
        panel = RestorePanel(info, nnx.eval_shape(factory) if abstract else factory())
        panel.mode.value = options["strict"]
        if not options["strict"]:
            panel.missing.value, panel.unexpected.value = options["missing"], options["unexpected"]
            panel.cast.value = options["cast"]
        assert panel.options() == options
        target = nnx.eval_shape(factory) if abstract else factory()
        try:
            ncw.restore(mlp_ckpt, target, **options)
        except ncw.CheckpointMismatchError:
            assert panel.phase == "warn", (kind, abstract, options, panel.status)
        else:
            assert panel.phase == "ready", (kind, abstract, options, panel.status)
