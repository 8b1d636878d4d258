"""The ``danlu`` command line: ``danlu compare`` and ``danlu speed`` (also ``python -m danlu ...``).

Errors in the arguments (an unknown optimizer, a bad number) print one line and exit with status 2, and
so does a bad entry point of your own (``--task MODULE:ATTR``, ``--params-from MODULE:ATTR``; the
protocol is in :mod:`danlu.bench.user_task`) or an exception from its code during training: the report
is written only after every run has finished, into a fresh directory moved into place.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch

from .. import __version__
from .experiments import EXPERIMENT_NAMES
from .tasks import TASKS, Task
from .user_task import UserTaskError, check_task, is_entry_point, load_param_shapes, load_task
from .speed import (_split, baselines, compiler_setup_seconds, default_names, format_table, is_valid_name,
                    results_json, run_speed, stream_bandwidth, transformer_shapes)

__all__ = ["main", "DEFAULT_TASKS", "DEFAULT_OPTIMIZERS", "QUICK_STEPS", "AUTO_FACTORS", "AUTO_EXTENSIONS"]

DEFAULT_TASKS = ("digits", "charlm")
DEFAULT_OPTIMIZERS = ("adamw", "lion", "adax", "adafactor", "amos")
QUICK_STEPS = {"digits": 600, "charlm": 300}  # the no-argument suite: ≤ 5 minutes on 2 CPU cores
AUTO_FACTORS = (1 / 3, 1.0, 3.0)  # --lrs auto: the task's default lr for the optimizer times these
AUTO_EXTENSIONS = 2  # --lrs auto: while the best lr is at an end of the grid, add the next one (at most this many)

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


def _fail(command: str, message: str) -> NoReturn:
    """One line on stderr and exit status 2, as argparse's errors (without the usage line: the arguments
    parsed; what they name is at fault)."""
    sys.stderr.write(f"danlu {command}: error: {message}\n")
    raise SystemExit(2)


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
    size = speed.add_mutually_exclusive_group()
    size.add_argument("--params", type=_positive_float, default=None,
                      help="number of parameters of a transformer-shaped set of tensors (default 30e6)")
    size.add_argument("--params-from", default=None, metavar="MODULE:ATTR",
                      help="time the step on your model's parameter shapes instead: ATTR() (or ATTR(seed)) returns "
                      "an nn.Module, an iterable of tensors, or a task (see --task MODULE:ATTR); a file path "
                      "path/to/file.py:ATTR works too")
    speed.add_argument("--optimizers", default=None,
                       help="comma-separated names (default: every danlu optimizer that steps from .grad, "
                       "and every installed baseline)")
    speed.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    speed.add_argument("--device", default="cpu")
    speed.add_argument("--repeats", type=_positive_int, default=10, help="timed rounds (default 10)")
    speed.add_argument("--json", action="store_true", help="print JSON instead of a table")

    compare = sub.add_parser(
        "compare",
        help="train optimizers on real tasks, sweep the lr, and write a report",
        description="For each task x optimizer, sweep the learning rates, pick the best by mean final val "
        "loss over seeds (diverged runs excluded), and report mean ± std, steps to target, time per step "
        "and optimizer-state bytes per parameter. Writes report.md, PNG plots and results.json into --out. "
        f"With no --task: the default suite ({', '.join(DEFAULT_TASKS)} x {', '.join(DEFAULT_OPTIMIZERS)}) "
        "on a quick budget and 1 seed.",
    )
    compare.add_argument("--task", nargs="+", default=None, metavar="TASK",
                         help=f"one or more of {', '.join(TASKS)} (default: {' '.join(DEFAULT_TASKS)}), or a task "
                         "of your own as MODULE:ATTR (or path/to/file.py:ATTR): ATTR() returns a "
                         "danlu.bench.user_task.UserTask or a dict with model(seed), batches(seed), "
                         "loss_fn(model, batch), metric(model) (lower is better) and steps")
    compare.add_argument("--optimizers", default=None,
                         help="comma-separated names (default: " + ",".join(DEFAULT_OPTIMIZERS)
                         + ", those that suit each task; a task none of them suits uses all it suits)")
    compare.add_argument("--steps", type=int, default=None,
                         help="steps per run (default: each task's default budget; the quick budget "
                         "of the default suite when no --task is given)")
    compare.add_argument("--seeds", type=int, default=None,
                         help="seeds per lr (default 3; 1 for the default suite)")
    compare.add_argument("--lrs", default="auto",
                         help="'auto' (default: each optimizer's default lr for the task times 1/3, 1 and 3, "
                         f"extended by one more factor of 3 while the best lr is at an end of the grid, at most "
                         f"{AUTO_EXTENSIONS} times) or a comma-separated list of numbers")
    compare.add_argument("--out", default="danlu-report",
                         help="output directory (default danlu-report); it must not exist, be empty, or "
                         "hold an earlier danlu report, which is replaced")
    compare.add_argument("--experiment", nargs="+", default=None, metavar="NAME",
                         help="run one or more of the essays' claims as fixed protocols instead of a sweep "
                         f"({', '.join(EXPERIMENT_NAMES)}, or 'all'); --steps and --seeds override the "
                         "protocol's budget; --task, --optimizers and --lrs do not apply")
    compare.add_argument("--quiet", action="store_true", help="no progress bar and no leaderboard")
    return parser


def _speed(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    known = default_names()
    names = known if args.optimizers is None else [n.strip().lower() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if not is_valid_name(n, known)]
    if unknown or not names:
        parser.error(f"unknown optimizer(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)} "
                     "(and <name>-bf16, <name>-fused-bf16 for those with bfloat16 state)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"device {args.device!r} is not available")
    if "torch-adamw-fused" not in names and "torch-adamw-fused" in baselines():
        names = ["torch-adamw-fused"] + names  # the reference every ratio is measured against
    if args.params_from is not None:
        try:
            shapes = load_param_shapes(args.params_from)
        except UserTaskError as exc:
            _fail("speed", str(exc))
        n = sum(torch.Size(s).numel() for s in shapes)
        what = f"{_count(n)} parameters in {len(shapes)} tensors from {args.params_from}"
    else:
        shapes = transformer_shapes(30e6 if args.params is None else args.params)
        n = sum(torch.Size(s).numel() for s in shapes)
        what = f"{n / 1e6:.1f}M parameters"
    bandwidth = stream_bandwidth(args.device)
    peers = baselines()
    setup = compiler_setup_seconds(args.device) if any(_split(n)[1] for n in names if n not in peers) else None
    results = run_speed(names, shapes=shapes, dtype=_DTYPES[args.dtype], device=args.device,
                        repeats=args.repeats, bandwidth=bandwidth)
    header = (f"danlu {__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
              f"{args.device}, {args.dtype}, {what}, {args.repeats} interleaved rounds")
    if args.json:
        print(json.dumps({"environment": header, "n_params": n, "params_from": args.params_from,
                          "stream_bandwidth_bytes_per_s": bandwidth, "compiler_setup_s": setup,
                          "results": results_json(results)}, indent=2))
    else:
        if setup is not None:
            header += f"; compiler setup (once per process, before the first fused step) {setup:.1f} s"
        print(format_table(results, n, header, bandwidth))
    return 0


def _count(n: int) -> str:
    """A parameter count for a header: 1234 → "1234", 2.5e6 → "2.50M"."""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else str(n)


def _is_earlier_report(path: Path) -> bool:
    from .report import MARKER

    try:
        return json.loads((path / "results.json").read_text(encoding="utf-8")).get("generator") == MARKER
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_earlier_report(out))):
        parser.error(f"output directory {str(out)!r} exists and holds something other than a danlu report; "
                     "choose another --out")


class _Progress:
    """A rich progress bar with an ETA over ``total`` units on stderr, or nothing when ``quiet``."""

    def __init__(self, total: int, quiet: bool) -> None:
        self._bar = None
        if not quiet:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=True)
            self._id = self._bar.add_task("compare", total=total)

    def __enter__(self) -> "_Progress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def describe(self, description: str) -> None:
        if self._bar is not None:
            self._bar.update(self._id, description=description)

    def add(self, units: int) -> None:
        """Grow the total (work discovered on the way, e.g. an lr grid extended at its edge)."""
        if self._bar is not None:
            self._bar.update(self._id, total=(self._bar.tasks[0].total or 0) + units)

    def advance(self, units: int, description: str | None = None) -> None:
        if self._bar is not None:
            self._bar.advance(self._id, units)
            if description is not None:
                self._bar.update(self._id, description=description)


def _write_atomically(out: Path, write: Any) -> Any:
    """Call ``write(tmp)`` on a fresh directory beside ``out``, then move it into place (replacing an
    earlier report): never a half-written report."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        result = write(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


Plan = list[tuple[Task, str, list[float], int, int]]


def _load_tasks(names: list[str], parser: argparse.ArgumentParser) -> tuple[list[Task], dict[str, str]]:
    """The tasks ``names`` give, embedded or entry points (imported and checked for their declared
    fields, not yet built), and {task name: entry point} for the latter."""
    names = [n if is_entry_point(n) else n.lower() for n in names]
    unknown = [n for n in names if not is_entry_point(n) and n not in TASKS]
    if unknown or not names:
        parser.error(f"unknown task(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(TASKS)}, "
                     "or a task of your own as MODULE:ATTR")
    tasks: list[Task] = []
    sources: dict[str, str] = {}
    for name in dict.fromkeys(names):
        if not is_entry_point(name):
            tasks.append(TASKS[name])
            continue
        try:
            task = load_task(name)
        except UserTaskError as exc:
            _fail("compare", str(exc))
        tasks.append(task)
        sources[task.name] = name
    seen: set[str] = set()
    for task in tasks:
        if task.name in seen:
            _fail("compare", f"two tasks are named {task.name!r}; give your task another name (UserTask(name=...))")
        seen.add(task.name)
    return tasks, sources


def _compare_plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Plan, dict[str, str]]:
    """Validate the arguments (parser.error: one line, exit 2) and return the sweeps to do,
    (task, optimizer, lrs, seeds, steps), and {task name: entry point} for the tasks of the user's own,
    each checked on a build with seed 0 before anything runs."""
    from ..registry import list_optimizers

    suite = args.task is None
    names = list(DEFAULT_TASKS) if suite else [t.strip() for t in args.task if t.strip()]
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be an integer ≥ 1, got {args.steps}")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be an integer ≥ 1, got {args.seeds}")
    seeds = args.seeds or (1 if suite else 3)
    explicit_lrs = None
    if args.lrs.strip().lower() != "auto":
        try:
            explicit_lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--lrs must be 'auto' or a comma-separated list of numbers, got {args.lrs!r}")
        if not explicit_lrs or not all(math.isfinite(x) and x > 0 for x in explicit_lrs):
            parser.error(f"--lrs must be 'auto' or a comma-separated list of positive numbers, got {args.lrs!r}")
    if args.optimizers is not None:
        opts = [o.strip().lower() for o in args.optimizers.split(",") if o.strip()]
        known = list_optimizers()
        bad = [o for o in opts if o not in known]
        if bad or not opts:
            parser.error(f"unknown optimizer(s) {', '.join(bad) or '(none given)'}; known: {', '.join(known)}")
    _check_out(args, parser)
    tasks, sources = _load_tasks(names, parser)  # imports the user's modules: after the cheap checks
    if args.optimizers is not None:
        for task in tasks:
            unsuited = [o for o in opts if o not in task.suits]
            if unsuited:
                parser.error(f"optimizer(s) {', '.join(unsuited)} not supported on task {task.name!r}; "
                             f"it supports: {', '.join(task.suits)}")
    plan: Plan = []
    for task in tasks:
        if args.optimizers is not None:
            task_opts = opts
        else:
            task_opts = [o for o in DEFAULT_OPTIMIZERS if o in task.suits] or list(task.suits)
        steps = args.steps or (QUICK_STEPS.get(task.name, task.default_steps) if suite else task.default_steps)
        for opt in task_opts:
            lrs = explicit_lrs or [task.default_lr(opt) * f for f in AUTO_FACTORS]
            plan.append((task, opt, [float(f"{lr:.6g}") for lr in lrs], seeds, steps))
    for task in tasks:
        if task.name in sources:
            try:
                check_task(task, [p[1] for p in plan if p[0] is task])
            except UserTaskError as exc:
                _fail("compare", str(exc))
    return plan, sources


def _advancer(progress: _Progress, name: str) -> Callable[[int, str], None]:
    """What an experiment reports its progress to: ``advance(units, what)``."""
    return lambda units, what: progress.advance(units, f"{name}: {what}")


def _experiments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .experiments import Context, get_experiment, write_experiment_report
    from .report import MARKER, environment

    misplaced = [flag for flag, value in (("--task", args.task), ("--optimizers", args.optimizers))
                 if value is not None] + (["--lrs"] if args.lrs.strip().lower() != "auto" else [])
    if misplaced:
        parser.error(f"{', '.join(misplaced)} cannot be combined with --experiment (each experiment fixes its own)")
    names = [n.strip().lower() for n in args.experiment if n.strip()]
    if names == ["all"]:
        names = list(EXPERIMENT_NAMES)
    unknown = [n for n in names if n not in EXPERIMENT_NAMES]
    if unknown or not names:
        parser.error(f"unknown experiment(s) {', '.join(unknown) or '(none given)'}; known: "
                     f"{', '.join(EXPERIMENT_NAMES)}, all")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be an integer ≥ 1, got {args.steps}")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be an integer ≥ 1, got {args.seeds}")
    _check_out(args, parser)
    experiments = [get_experiment(n) for n in dict.fromkeys(names)]
    budgets = [(args.seeds or e.default_seeds, args.steps or e.default_steps) for e in experiments]
    total = sum(e.units(seeds, steps) for e, (seeds, steps) in zip(experiments, budgets))

    def write(tmp: Path) -> list[Any]:
        done = []
        with _Progress(total, args.quiet) as progress:
            for e, (seeds, steps) in zip(experiments, budgets):
                progress.describe(e.name)
                ctx = Context(seeds, steps, tmp, _advancer(progress, e.name), progress.add)
                t0 = time.perf_counter()
                outcome = e.run(ctx)
                done.append((e, ctx, outcome, time.perf_counter() - t0))
        write_experiment_report(tmp, done, environment(), MARKER)
        return done

    done = _write_atomically(Path(args.out), write)
    for e, _ctx, outcome, _seconds in done:
        if not args.quiet:
            print(f"{e.name}: {outcome.verdict}. {outcome.reason}")
    print(f"report: {Path(args.out) / 'report.md'} ({len(done)} experiment(s) in "
          f"{sum(d[3] for d in done):.0f} s)")
    return 0


def _compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .loop import run, sweep
    from .report import format_leaderboard, write_report

    plan, sources = _compare_plan(args, parser)
    out = Path(args.out)
    auto = args.lrs.strip().lower() == "auto"
    config = {"tasks": list(dict.fromkeys(p[0].name for p in plan)),
              "optimizers": list(dict.fromkeys(p[1] for p in plan)),
              "steps": {p[0].name: p[4] for p in plan}, "seeds": plan[0][3],
              "lrs": args.lrs, "auto_factors": list(AUTO_FACTORS), "auto_extensions": AUTO_EXTENSIONS,
              "extended": []}
    if sources:
        config["user_tasks"] = sources
    results = []
    start = time.perf_counter()
    with _Progress(sum(len(p[2]) * p[3] * p[4] for p in plan), args.quiet) as progress:
        for task, opt, lrs, seeds, steps in plan:
            def run_one(lr: float, seed: int) -> Any:
                progress.describe(f"{task.name} {opt} lr={lr:g} seed={seed}")
                result = run(task, opt, lr, seed, steps)
                progress.advance(steps)
                return result

            def extended(lr: float) -> None:
                config["extended"].append({"task": task.name, "optimizer": opt, "lr": lr})
                progress.add(seeds * steps)

            try:
                by_lr = sweep(lrs, seeds, run_one, AUTO_EXTENSIONS if auto else 0,
                              AUTO_FACTORS[-1] / AUTO_FACTORS[-2], extended)
            except UserTaskError as exc:  # the task's own code failed mid-run: nothing has been written
                _fail("compare", str(exc))
            results += [r for runs in by_lr.values() for r in runs]
    config["wall_seconds"] = round(time.perf_counter() - start, 2)
    summaries = _write_atomically(out, lambda tmp: write_report(tmp, results, config))
    if not args.quiet:
        print(format_leaderboard(summaries))
        print()
    print(f"report: {out / 'report.md'} ({len(results)} runs in {config['wall_seconds']:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "speed":
        return _speed(args, parser)
    if args.command == "compare":
        return _experiments(args, parser) if args.experiment is not None else _compare(args, parser)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover (argparse refuses first)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
