"""`make reproduce`: the paper's comparison, as tables and plots, from one command.

    python -m sparcode_cli.reproduce                        # the [reproduce] matrix of experiments/reproduce.toml
    python -m sparcode_cli.reproduce --matrix reproduce-full --datasets movielens,gowalla --mirror ../shared/data

One module per job: `matrix` expands the TOML into training runs and evaluated cells, `jobs` trains / builds /
evaluates one of them through the library (in-process), `runner` schedules them (training in parallel, then
evaluation alone) with the `progress` overview, `report` and `plots` write `experiments/results/<dataset>.md`
and its PNGs, `reference` holds the published numbers set beside ours. The paired bootstrap is
`sparcode_cli.bootstrap`.
"""

from sparcode_cli.reproduce.matrix import EvalSpec, Plan, TrainSpec, expand
from sparcode_cli.reproduce.runner import run_plan

__all__ = ["EvalSpec", "Plan", "TrainSpec", "expand", "run_plan"]
