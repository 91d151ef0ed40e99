"""The command line prints what the library prints; errors are one line, never a traceback."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import run_cli
from flax import nnx

import nnx_ckpt_widgets as ncw
from nnx_ckpt_widgets.__main__ import main

MODELS = textwrap.dedent(
    """
    from flax import nnx


    class MLP(nnx.Module):
        def __init__(self, dhidden, rngs):
            self.linear1 = nnx.Linear(3, dhidden, rngs=rngs)
            self.linear2 = nnx.Linear(dhidden, 2, rngs=rngs)


    def same():
        return MLP(4, nnx.Rngs(0))


    def wider():
        return MLP(8, nnx.Rngs(0))


    def needs_arguments(width):
        return MLP(width, nnx.Rngs(0))


    def broken():
        raise RuntimeError("the factory is broken\\nsecond line")


    def not_a_model():
        return 3
    """
)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    (folder / "cli_models.py").write_text(MODELS)
    (folder / "cli_syntax_error.py").write_text("def make(:\n")
    return folder


@pytest.fixture
def on_path(models_dir, monkeypatch):
    """Make ``cli_models`` importable in this process too (in-process ``main`` calls)."""
    monkeypatch.syspath_prepend(str(models_dir))
    yield
    for name in ("cli_models", "cli_syntax_error"):
        sys.modules.pop(name, None)


def test_inspect_prints_the_library_summary(manager_ckpt):
    result = run_cli("inspect", str(manager_ckpt), "--step", "5", "--item", "model")
    assert result.returncode == 0, result.stderr
    assert result.stdout == str(ncw.inspect(manager_ckpt, step=5, item="model")) + "\n"
    assert "step 5" in result.stdout


def test_compare_prints_the_library_report(mlp_state_ckpt, models_dir, on_path):
    import cli_models

    result = run_cli(
        "compare", str(mlp_state_ckpt), "--model", "cli_models:wider", pythonpath=models_dir
    )
    assert result.returncode == 0, result.stderr
    expected = ncw.compare(mlp_state_ckpt, nnx.eval_shape(cli_models.wider))
    assert result.stdout == f"{expected}\nPlan (strict): {expected.plan()}\n"
    assert "shape mismatch" in result.stdout
    assert result.stdout.splitlines()[-2].startswith("To load it:")
    assert result.stdout.splitlines()[-1].startswith("Plan (strict): Refused: ")


def test_compare_prints_the_plan_of_its_options(capsys, mlp_state_ckpt, on_path):
    """The CLI shows the same plan restore carries out, for the options it is given."""
    import cli_models

    argv = ["compare", str(mlp_state_ckpt), "--model", "cli_models:same", "--lenient"]
    assert main([*argv, "--missing", "zeros", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = ncw.compare(mlp_state_ckpt, nnx.eval_shape(cli_models.same))
    assert data["plan"] == expected.plan(strict=False, missing="zeros").as_dict()
    assert data["plan"]["ok"] and data["plan"]["read_arrays"] == 4


def test_error_is_one_line_without_traceback(tmp_path):
    missing = tmp_path / "nope"
    result = run_cli("inspect", str(missing))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [
        f"error: No checkpoint at {missing}: the path does not exist; check the spelling or the "
        "working directory."
    ]


# The remaining error paths run ``main`` in-process: same code, no interpreter start-up each.


def _main_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_inspect_in_process_matches_library(capsys, mlp_state_ckpt):
    assert main(["inspect", str(mlp_state_ckpt)]) == 0
    assert capsys.readouterr().out == str(ncw.inspect(mlp_state_ckpt)) + "\n"


def test_item_selection_error(capsys, manager_ckpt):
    line = _main_error(capsys, "inspect", str(manager_ckpt))
    assert "model, optimizer" in line and str(manager_ckpt) in line


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("no_colon", "module:factory"),
        ("cli_models:absent", "cli_models:absent"),
        ("no_such_module_xyz:f", "no_such_module_xyz"),
        ("cli_syntax_error:make", "cli_syntax_error"),
        ("cli_models:needs_arguments", "cli_models:needs_arguments"),
        ("cli_models:broken", "the factory is broken"),
        ("cli_models:not_a_model", "int"),
    ],
)
def test_bad_model_factory(capsys, mlp_state_ckpt, on_path, spec, words):
    line = _main_error(capsys, "compare", str(mlp_state_ckpt), "--model", spec)
    assert words in line
