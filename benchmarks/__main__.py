"""Benchmark suite: ``make bench`` (or ``python -m benchmarks``).

Every figure is a ratio of two sides measured in the same run, alternating A and B, with the
median of several repeats after a warm-up, because these machines are shared and noisy.
``NNX_CKPT_BENCH=smoke`` scales every size down for a quick correctness run (``make test``
runs it once); nothing here is ever asserted as a timing in the test suite.

Prints one table and writes ``benchmarks/results.json`` with the machine's facts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks import cases
from benchmarks._measure import Result, machine_facts

HERE = Path(__file__).parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--only", nargs="*", help="case numbers to run, e.g. 1 4")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args(argv)
    smoke = os.environ.get("NNX_CKPT_BENCH", "") == "smoke"
    size = cases.SMOKE if smoke else cases.FULL
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="nnx-ckpt-bench-") as tmp:
        for number, case in cases.ALL:
            if args.only and str(number) not in args.only:
                continue
            print(f"case {number}: {case.__doc__.splitlines()[0]}", file=sys.stderr, flush=True)
            results.extend(case(Path(tmp), size))
    table = format_table(results, smoke)
    print(table)
    rows = [r.as_dict() for r in results]
    out = Path(args.out)
    if args.only and out.exists():
        # A partial run replaces its own cases' rows and keeps the others' from the last run.
        rerun = {r.number for r in results}
        kept = [r for r in json.loads(out.read_text())["results"] if r["number"] not in rerun]
        rows = sorted(kept + rows, key=lambda r: int(str(r["number"])))
    report = {"scale": "smoke" if smoke else "full", "machine": machine_facts(), "results": rows}
    if not smoke:
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


def format_table(results: list[Result], smoke: bool) -> str:
    """The results as a table; a smoke run's sizes are too small to judge a target."""
    rows = [("#", "case", "ours", "reference", "ratio", "target", "met", "note")]
    for r in results:
        rows.append(
            (
                str(r.number),
                r.name,
                r.ours_text,
                r.reference_text,
                f"{r.ratio:.3f}" if r.ratio is not None else "-",
                r.target_text,
                r.verdict if not smoke else "(smoke)",
                r.note,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
