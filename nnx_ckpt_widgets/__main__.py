"""Command line: ``inspect PATH``, ``compare PATH --model M:F``, ``stats PATH``, ``diff A [B]``,
``convert SRC DST``.

Each prints the same text as the library. On error they print the one-line message and exit 1,
with no traceback. ``stats`` and ``diff`` with ``--fail-on-nan`` exit 3 when NaN or Inf is
found (in ``diff``, on the second side), so that a training pipeline can stop on it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Sequence
from typing import TextIO

from nnx_ckpt_widgets.errors import CheckpointError, InvalidArgumentError, first_line
from nnx_ckpt_widgets.plan import MISSING_POLICIES, UNEXPECTED_POLICIES

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
        ("convert", "write a checkpoint as Hugging Face safetensors or as an Orbax checkpoint"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument(
            "path",
            help="an Orbax checkpoint (v0 or v1), a root of steps, a step folder, or "
            "safetensors (a file, or a folder of shards with their index); local or gs://",
        )
        if name == "convert":
            _convert_arguments(sub)
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
            _max_memory_argument(sub)
        if name == "compare":
            sub.add_argument(
                "--model",
                required=True,
                metavar="MODULE:FACTORY",
                help="a function of no arguments returning the model, e.g. mypkg.models:make",
            )
            sub.add_argument(
                "--lenient",
                action="store_true",
                help="plan a lenient restore (strict=False) instead of a strict one",
            )
            sub.add_argument(
                "--missing",
                choices=MISSING_POLICIES,
                default="keep",
                help="with --lenient: keep or zero-fill the model's keys the checkpoint lacks",
            )
            sub.add_argument(
                "--unexpected",
                choices=UNEXPECTED_POLICIES,
                default="ignore",
                help="with --lenient: ignore the checkpoint's extra keys, or refuse them",
            )
            sub.add_argument("--cast", action="store_true", help="allow dtype casts")
            _key_arguments(sub)
    return parser


def _key_arguments(sub: argparse.ArgumentParser) -> None:
    """``--rename``, ``--stack`` and ``--unstack``: restore's key options, for compare and
    convert."""
    sub.add_argument(
        "--rename",
        nargs=2,
        action="append",
        metavar=("REGEX", "REPLACEMENT"),
        help="map checkpoint keys (repeatable), as rename= does",
    )
    for option, words in (
        ("stack", "per-layer keys into one stacked array"),
        ("unstack", "a stacked array into per-layer arrays"),
    ):
        sub.add_argument(
            f"--{option}",
            nargs=2,
            action="append",
            metavar=("REGEX", "AXIS"),
            help=f"{words} (repeatable), as {option}= does, e.g. '^decoder/layers/(\\d+/)' 1",
        )


def _convert_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "dst",
        help="the folder to write, local or gs:// (or a file ending in .safetensors); it must "
        "not exist",
    )
    sub.add_argument(
        "--to",
        choices=("safetensors", "orbax", "orbax-v1"),
        help="the format to write (default: from DST's suffix .safetensors)",
    )
    sub.add_argument(
        "--dry-run", action="store_true", help="print what would be written, and write nothing"
    )
    sub.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="bytes per safetensors file, e.g. 5GB or 500MiB (default: 5GB)",
    )
    sub.add_argument(
        "--select", metavar="REGEX", help="only the arrays whose key matches, e.g. ^model/"
    )
    sub.add_argument(
        "--cast", metavar="DTYPE", help="cast every float array to this dtype, e.g. bfloat16"
    )
    sub.add_argument("--overwrite", action="store_true", help="replace DST when it exists")
    sub.add_argument("--no-progress", action="store_true", help="no progress bar")
    _max_memory_argument(sub)
    _key_arguments(sub)


def _max_memory_argument(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="memory the reads may use, e.g. 512MiB (default: a quarter of the "
        "available memory, at most 4GiB)",
    )


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


def _axes(pairs: list[list[str]] | None) -> dict[str, int]:
    """``--stack REGEX AXIS`` pairs as the ``stack=`` mapping."""
    out = {}
    for pattern, axis in pairs or ():
        try:
            out[pattern] = int(axis)
        except ValueError as err:
            raise InvalidArgumentError(
                f"The axis after {pattern!r} must be an integer, got {axis!r}."
            ) from err
    return out


def _finite(data: object) -> object:
    """``data`` with every non-finite float as ``None``, as ``stats`` and ``diff`` write them:
    ``NaN`` and ``Infinity`` are not JSON (a config.json may hold them; Python reads them)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(value) for value in data]
    return data


def _json(data: object, ascii_only: bool = False) -> str:
    """Strict JSON (``allow_nan=False``); checkpoint metadata is nested at most 64 deep, so
    the recursion here is bounded."""
    return json.dumps(
        _finite(data),
        indent=2,
        sort_keys=True,
        default=str,
        ensure_ascii=ascii_only,
        allow_nan=False,
    )


def _encodable(text: str, stream: TextIO) -> bool:
    try:
        text.encode(stream.encoding or "utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _print(text: str, stream: TextIO | None = None) -> None:
    """Print text from a checkpoint whatever it holds: a lone surrogate (``"w\\ud800"``, valid
    in JSON) or a character the stream cannot encode is written as a backslash escape."""
    stream = sys.stdout if stream is None else stream
    if not _encodable(text, stream):
        encoding = stream.encoding or "utf-8"
        text = text.encode(encoding, "backslashreplace").decode(encoding)
    print(text, file=stream)


def _print_json(data: object) -> None:
    """Print ``data`` as JSON; where the stream cannot take a string as it is (a lone
    surrogate), every non-ASCII character is written as a JSON ``\\u`` escape instead."""
    text = _json(data)
    _print(text if _encodable(text, sys.stdout) else _json(data, ascii_only=True))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    from nnx_ckpt_widgets import compare, diff, inspect, stats

    try:
        if args.command == "convert":
            from nnx_ckpt_widgets import convert

            written = convert(
                args.path,
                args.dst,
                to=args.to,
                step=args.step,
                item=args.item,
                select=args.select,
                cast=args.cast,
                rename=dict(args.rename or ()),
                stack=_axes(args.stack),
                unstack=_axes(args.unstack),
                max_shard_size=args.max_shard_size,
                overwrite=args.overwrite,
                dry_run=args.dry_run,
                progress=False if args.no_progress else None,
                max_memory=args.max_memory,
            )
            print(_json(written.as_dict()) if args.json else written)
            return 0
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
            if args.json:
                _print_json(found.as_dict())
            else:
                _print(str(found))
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
            if args.json:
                _print_json(changes.as_dict())
            else:
                _print(str(changes))
            return NAN_EXIT if args.fail_on_nan and changes.nonfinite_b else 0
        if args.command == "inspect":
            info = inspect(args.path, step=args.step, item=args.item)
            if args.json:
                _print_json(info.as_dict())
            else:
                _print(str(info))
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
            report = compare(
                args.path,
                target,
                step=args.step,
                item=args.item,
                rename=dict(args.rename or ()),
                stack=_axes(args.stack),
                unstack=_axes(args.unstack),
            )
            plan = report.plan(
                strict=not args.lenient,
                missing=args.missing,
                unexpected=args.unexpected,
                cast=args.cast,
            )
            if args.json:
                _print_json({**report.as_dict(), "plan": plan.as_dict()})
            else:
                _print(f"{report}\nPlan ({'lenient' if args.lenient else 'strict'}): {plan}")
    except CheckpointError as err:
        _print(f"error: {err}", sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
