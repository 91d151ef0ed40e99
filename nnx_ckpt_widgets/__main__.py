"""Command line: ``inspect PATH``, ``compare PATH --model M:F``, ``stats PATH``, ``diff A [B]``.

Each prints the same text as the library. On error they print the one-line message and exit 1,
with no traceback. ``stats`` and ``diff`` with ``--fail-on-nan`` exit 3 when NaN or Inf is
found (in ``diff``, on the second side), so that a training pipeline can stop on it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from nnx_ckpt_widgets.errors import CheckpointError, InvalidArgumentError, first_line

NAN_EXIT = 3  # --fail-on-nan and a NaN or Inf was found


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nnx_ckpt_widgets",
        description="Inspect a Flax NNX checkpoint, or compare it with a model.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("inspect", "what a checkpoint holds, from metadata only"),
        ("compare", "how a checkpoint fits a model: the load report"),
        ("stats", "value statistics of each array: min, max, mean, std, norm, NaN, Inf, zeros"),
        ("diff", "how two checkpoints, or two steps of a root, differ array by array"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument(
            "path",
            help="an Orbax checkpoint (v0 or v1), a root of steps, a step folder, or "
            "safetensors (a file, or a folder of shards with their index); local or gs://",
        )
        if name == "diff":
            sub.add_argument("other", nargs="?", help="the second checkpoint (default: PATH)")
            sub.add_argument(
                "--steps",
                type=_step_or_latest,
                nargs=2,
                metavar=("A", "B"),
                help="the step of each side, e.g. --steps 100 200, with - for the latest step "
                "or a side that is not a root (default: latest)",
            )
        else:
            sub.add_argument(
                "--step", type=int, help="step under a root of steps (default: latest)"
            )
        if name == "diff":
            sub.add_argument(
                "--item",
                nargs="+",
                metavar="NAME",
                help="item (checkpointable) to read on both sides, e.g. model; or one per side, "
                "with - for a side that holds one unnamed tree, e.g. --item - model",
            )
        else:
            sub.add_argument("--item", help="item (checkpointable) to read, e.g. model")
        sub.add_argument(
            "--json", action="store_true", help="print JSON for scripts instead of a table"
        )
        if name in ("stats", "diff"):
            sub.add_argument(
                "--select", metavar="REGEX", help="only the arrays whose key matches, e.g. kernel$"
            )
            sub.add_argument(
                "--fail-on-nan",
                action="store_true",
                help=f"exit with status {NAN_EXIT} when an array holds NaN or Inf",
            )
            sub.add_argument("--no-progress", action="store_true", help="no progress bar")
            sub.add_argument(
                "--max-memory",
                metavar="SIZE",
                help="memory the reads may use, e.g. 512MiB (default: a quarter of the "
                "available memory, at most 4GiB)",
            )
        if name == "compare":
            sub.add_argument(
                "--model",
                required=True,
                metavar="MODULE:FACTORY",
                help="a function of no arguments returning the model, e.g. mypkg.models:make",
            )
    return parser


def _load_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InvalidArgumentError(f"--model must look like module:factory, got {spec!r}.")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except Exception as err:  # ImportError, AttributeError, or whatever the module raises
        raise InvalidArgumentError(
            f"Cannot find the model factory {spec!r} ({first_line(err)}); check that the "
            "module is on PYTHONPATH and defines that function."
        ) from err


def _step_or_latest(text: str) -> int | None:
    """A ``--steps`` value: a step number, or ``-`` for the latest (or no step at all)."""
    if text == "-":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a step number or -: {text!r}") from None


def _diff_items(items: list[str] | None) -> str | tuple[str | None, str | None] | None:
    """``--item``'s one name (both sides) or two (one per side, ``-`` for none)."""
    if items is None or len(items) == 1:
        return None if items is None else items[0]
    if len(items) != 2:
        raise InvalidArgumentError(
            f"--item takes one name (both sides) or two (one per side), got {len(items)}: "
            f"{' '.join(items)}."
        )
    item_a, item_b = (None if name == "-" else name for name in items)
    return item_a, item_b


def _json(data: object) -> str:
    import json

    return json.dumps(data, indent=2, sort_keys=True, default=str, ensure_ascii=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    from nnx_ckpt_widgets import compare, diff, inspect, stats

    try:
        if args.command == "stats":
            progress = False if args.no_progress else None
            found = stats(
                args.path,
                step=args.step,
                item=args.item,
                select=args.select,
                progress=progress,
                max_memory=args.max_memory,
            )
            print(_json(found.as_dict()) if args.json else found)
            return NAN_EXIT if args.fail_on_nan and not found.ok else 0
        if args.command == "diff":
            if args.other is None and args.steps is None:
                raise InvalidArgumentError(
                    f"diff needs a second side: pass another checkpoint after {args.path!r}, or "
                    "--steps A B for two steps of a root."
                )
            changes = diff(
                args.path,
                args.other,
                steps=tuple(args.steps) if args.steps else None,
                item=_diff_items(args.item),
                select=args.select,
                progress=False if args.no_progress else None,
                max_memory=args.max_memory,
            )
            print(_json(changes.as_dict()) if args.json else changes)
            return NAN_EXIT if args.fail_on_nan and changes.nonfinite_b else 0
        if args.command == "inspect":
            info = inspect(args.path, step=args.step, item=args.item)
            print(_json(info.as_dict()) if args.json else info)
        else:
            from flax import nnx

            factory = _load_factory(args.model)
            try:
                target = nnx.eval_shape(factory)
            except Exception as err:  # the user's code: any error, reported on one line
                raise InvalidArgumentError(
                    f"The model factory {args.model!r} failed ({type(err).__name__}: "
                    f"{first_line(err)}); it must take no arguments and return an NNX model."
                ) from err
            report = compare(args.path, target, step=args.step, item=args.item)
            print(_json(report.as_dict()) if args.json else report)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
