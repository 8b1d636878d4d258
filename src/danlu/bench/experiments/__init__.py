"""The essays' claims as experiments: ``danlu compare --experiment NAME``.

Each experiment is a fixed protocol (task, arms, hyperparameters, steps, seeds) in its own module; it
writes its plots, and returns an :class:`Outcome` with what was expected, what was measured (with seeds
and spread) and a plain verdict. :func:`write_experiment_report` turns outcomes into ``report.md``
and ``results.json``. These are benchmarks, not tests: the test suite runs them only with tiny budgets.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any, Mapping

from ._common import Context, Experiment, Outcome

__all__ = ["EXPERIMENT_NAMES", "get_experiment", "write_experiment_report", "Context", "Experiment", "Outcome"]

_MODULES = {
    "lion-vs-adamw": "lion_vs_adamw",
    "accumulation": "accumulation",
    "eg-step-size": "eg_step_size",
    "implicit-regularization": "implicit_regularization",
    "zero-order": "zero_order",
    "amos": "amos",
    "lion-batch-size": "lion_batch_size",
    "fewer-updates": "fewer_updates",
    "recipes-transfer": "recipes_transfer",
    "adax-beta": "adax_beta",
    "sampling-view": "sampling_view",
    "eg-distribution-shift": "eg_distribution_shift",
}
EXPERIMENT_NAMES: tuple[str, ...] = tuple(_MODULES)


def get_experiment(name: str) -> Experiment:
    """The experiment called ``name``; a ValueError lists the known names otherwise."""
    key = name.strip().lower()
    if key not in _MODULES:
        raise ValueError(f"Unknown experiment {name!r}; known: {', '.join(EXPERIMENT_NAMES)}")
    return importlib.import_module(f"{__name__}.{_MODULES[key]}").EXPERIMENT


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _markdown(results: list[tuple[Experiment, Context, Outcome, float]], env: dict[str, Any]) -> str:
    from ._common import Z

    lines = ["# danlu compare: experiments", "",
             f"danlu {env['danlu_version']} (commit {env['git_commit'] or 'n/a'}), torch {env['torch_version']}, "
             f"{env['processor']}, {env['cpu_count']} CPUs.", "",
             f"A difference between two arms *counts* when it exceeds {Z:g} standard errors of the "
             "difference over seeds (Welch); with one seed nothing counts.", ""]
    lines += ["| experiment | verdict | seeds | steps | seconds |", "|---|---|---|---|---|"]
    lines += [f"| [{e.name}](#{e.name}) | **{o.verdict}** | {c.seeds} | {c.steps} | {sec:.0f} |"
              for e, c, o, sec in results]
    lines.append("")
    for e, _c, o, _sec in results:
        lines += [f'<a id="{e.name}"></a>', f"## {e.name}: {e.title}", "", o.protocol, ""]
        for headers, rows in o.tables:
            lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
        lines += [f"![{p}]({p})" for p in o.plots] + [""]
        lines += [f"**Expected.** {o.expected}", "", f"**Measured.** {o.measured}", "",
                  f"**Verdict: {o.verdict}.** {o.reason}", ""]
    return "\n".join(lines)


def write_experiment_report(out: Path, results: list[tuple[Experiment, Context, Outcome, float]],
                            env: dict[str, Any], marker: str) -> None:
    """Write report.md and results.json for (experiment, context, outcome, seconds) tuples into ``out``
    (which already holds the plots)."""
    (out / "report.md").write_text(_markdown(results, env), encoding="utf-8")
    payload = {"generator": marker, "environment": env,
               "experiments": [{"name": e.name, "title": e.title, "seeds": c.seeds, "steps": c.steps,
                                "seconds": round(sec, 2), "verdict": o.verdict, "reason": o.reason,
                                "expected": o.expected, "measured": o.measured, "plots": o.plots,
                                "tables": [{"headers": h, "rows": r} for h, r in o.tables],
                                "data": _json_safe(o.data)}
                               for e, c, o, sec in results]}
    (out / "results.json").write_text(json.dumps(payload, indent=1, allow_nan=False), encoding="utf-8")
