"""Command line: ``python -m nnx_ckpt_widgets inspect PATH`` and ``... compare PATH --model M:F``.

Both print the same text as the library. On error they print the one-line message and exit 1,
with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from nnx_ckpt_widgets.errors import CheckpointError, InvalidArgumentError, first_line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nnx_ckpt_widgets",
        description="Inspect a Flax NNX checkpoint, or compare it with a model.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("inspect", "what a checkpoint holds, from metadata only"),
        ("compare", "how a checkpoint fits a model: the load report"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument(
            "path",
            help="an Orbax checkpoint (v0 or v1), a root of steps, a step folder, or "
            "safetensors (a file, or a folder of shards with their index); local or gs://",
        )
        sub.add_argument("--step", type=int, help="step under a root of steps (default: latest)")
        sub.add_argument("--item", help="item (checkpointable) to read, e.g. model")
        sub.add_argument(
            "--json", action="store_true", help="print JSON for scripts instead of a table"
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


def _json(data: object) -> str:
    import json

    return json.dumps(data, indent=2, sort_keys=True, default=str, ensure_ascii=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    from nnx_ckpt_widgets import compare, inspect

    try:
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
