"""The ``danlu`` command line: ``danlu speed`` (``python -m danlu speed``).

Errors in the arguments (an unknown optimizer, a bad number) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from .. import __version__
from .speed import baselines, default_names, format_table, results_json, run_speed, transformer_shapes

__all__ = ["main"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="danlu", description="danlu optimizer tools")
    parser.add_argument("--version", action="version", version=f"danlu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    speed = sub.add_parser(
        "speed",
        help="step time and state memory of danlu's optimizers and the installed baselines",
        description="Time optimizer steps interleaved on a transformer-shaped set of tensors; report the "
        "median step time, its ratio to torch's fused AdamW in the same run, and state bytes per parameter.",
    )
    speed.add_argument("--params", type=_positive_float, default=30e6, help="number of parameters (default 30e6)")
    speed.add_argument("--optimizers", default=None,
                       help="comma-separated names (default: every danlu optimizer that steps from .grad, "
                       "and every installed baseline)")
    speed.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    speed.add_argument("--device", default="cpu")
    speed.add_argument("--repeats", type=_positive_int, default=10, help="timed rounds (default 10)")
    speed.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _speed(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    known = default_names()
    names = known if args.optimizers is None else [n.strip().lower() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"unknown optimizer(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"device {args.device!r} is not available")
    if "torch-adamw-fused" not in names and "torch-adamw-fused" in baselines():
        names = ["torch-adamw-fused"] + names  # the reference every ratio is measured against
    results = run_speed(names, n_params=args.params, dtype=_DTYPES[args.dtype], device=args.device,
                        repeats=args.repeats)
    n = sum(torch.Size(s).numel() for s in transformer_shapes(args.params))
    header = (f"danlu {__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
              f"{args.device}, {args.dtype}, {n / 1e6:.1f}M parameters, {args.repeats} interleaved rounds")
    if args.json:
        print(json.dumps({"environment": header, "results": results_json(results)}, indent=2))
    else:
        print(format_table(results, int(args.params), header))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "speed":
        return _speed(args, parser)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover (argparse refuses first)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
