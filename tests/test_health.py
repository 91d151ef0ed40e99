"""``check_steps``: the first bad step of a run, in time, and the last good one before it."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from conftest import save_checkpoint, save_manager

import nnx_ckpt_widgets as nw

BASE = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)


def _step(scale: float, nan: bool = False) -> dict:
    w = (BASE * np.float32(scale)).astype(np.float32)
    b = np.ones(4, np.float32) * np.float32(scale)
    if nan:
        w[0, 0] = b[1] = np.nan
    return {"model": {"b": b, "frozen": BASE, "w": w}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Steps 0-20 move 1% at a time; step 25 is a blow-up (finite, x1e11); NaN from step 30."""
    steps = {s: _step(1 + 0.01 * (s // 5)) for s in (0, 5, 10, 15, 20)}
    steps[25] = _step(1e11)
    steps[30] = _step(1e11, nan=True)
    steps[35] = _step(1e11, nan=True)
    return save_manager(tmp_path_factory.mktemp("health") / "run", steps)


def test_the_last_good_step_is_found_not_assumed(run):
    report = nw.check_steps(run, item="model", progress=False)
    assert [s.step for s in report] == [0, 5, 10, 15, 20, 25, 30, 35]
    # Step 25 is finite: only its move gives it away.
    assert report[25].finite and not report[25].in_line and not report[25].good
    assert report.first_bad == 25 and report.last_good == 20
    assert report.first_nan == 30 and report.first_inf is None
    # Within one step, the arrays holding NaN in saved order; no order in time is claimed.
    assert report[30].with_nan == ("b", "w") and report[35].with_nan == ("b", "w")
    for step in (5, 10, 15, 20):
        expected = 0.01 / (1 + 0.01 * (step // 5 - 1))  # || x - y || / || x || of a scaling
        assert math.isclose(report[step].change, expected, rel_tol=1e-4)
        assert report[step].good
    assert report[0].change is None and report[0].good
    assert math.isclose(report[25].change, 1e11 / 1.04 - 1, rel_tol=1e-4)
    assert report[25].baseline == pytest.approx(
        np.median([report[s].change for s in (5, 10, 15, 20)])
    )
    assert report.summary() == (
        f"8 steps: last good step 20; first bad step 25 (moved "
        f"{report[25].change / report[25].baseline:.2g} × the median before); first NaN at step 30."
    )
    assert report[30].verdict() == "NaN in 2 of 3 arrays: b, w"
    text = str(report)
    assert text.splitlines()[0] == f"Steps of {run}, item 'model'"
    assert "first" not in report[30].verdict()
    data = json.loads(json.dumps(report.as_dict(), allow_nan=False))
    assert data["last_good"] == 20 and data["first_nan"] == 30 and data["first_bad"] == 25
    html = report._repr_html_()
    rows = {re.search(r"<td[^>]*>([^<]*)<", r).group(1): r for r in html.split("<tr")[2:]}
    assert "color:" in rows["25"] and "color:" in rows["30"]  # drawn in the error colour
    assert "color:" not in rows["20"]


def test_a_healthy_run_is_good_to_the_end(run):
    report = nw.check_steps(run, item="model", select="^frozen$", progress=False)
    assert report.first_bad is None and report.last_good == 35
    assert [s.change for s in report][1:] == [0.0] * 7  # frozen: never moved
    assert report.summary() == "8 steps: all finite, every move in line; last good step 35."


def test_bad_input(run, tmp_path):
    with pytest.raises(nw.InvalidArgumentError, match="factor must be a number above 1"):
        nw.check_steps(run, item="model", factor=0.5)
    one = save_checkpoint(tmp_path / "one", {"x": np.zeros(2)})
    with pytest.raises(nw.InvalidArgumentError, match="needs a root of steps"):
        nw.check_steps(one)


def test_zero_started_arrays_and_rng_keys_keep_the_measure_finite(tmp_path):
    """A bias that starts at zeros has no size of its own and a PRNG key has no norm: the move
    of a step pools the sums of squares of the arrays that have one."""
    import jax

    steps = {}
    for i, step in enumerate((0, 5, 10)):
        steps[step] = {
            "model": {
                "bias": np.full(4, 0.1 * i, np.float32),
                "key": jax.random.key(step),
                "w": (BASE * np.float32(1 + 0.01 * i)).astype(np.float32),
            }
        }
    root = save_manager(tmp_path / "run", steps)
    report = nw.check_steps(root, item="model", progress=False)
    assert report.first_bad is None and report.last_good == 10
    w = [steps[s]["model"]["w"].astype(np.float64) for s in (0, 5)]
    moved = math.sqrt(np.sum((w[1] - w[0]) ** 2) + 4 * 0.1**2)  # the bias moves from zeros
    assert math.isclose(report[5].change, moved / np.linalg.norm(w[0]), rel_tol=1e-5)
    direct = nw.diff(root, steps=(0, 5), item="model", progress=False)
    assert direct.relative_change == report[5].change
