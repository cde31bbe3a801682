"""A fixed training logit scale instead of the learned one: a prototype, patched in by this script (the package
always learns `log_logit_scale`, starting at `model.logit_scale`), measured against the target matrix's runs.

The patch freezes the scale at its initial value (`requires_grad = False` right after `SparCode.__init__`);
everything else is unchanged. With the defaults the learned scale drifts from 1.0 to about 1.1 in 400 steps
(metrics.jsonl's `logit_scale`). For each two-tower run of --encoder in --runs, SparCode is trained from it with
the target matrix's overrides into --out, a folder of its own: the runs' ids (and the code digest in their
meta.json) are the default config's, so they must not mix with unpatched runs. Each gets a `FIXED_SCALE`
marker file, and only a marked, finished run is reused. The table compares them with the same-seed SparCode runs
of --runs (the default, learned scale) and with the two-tower, as sparcode_ablation.py does.

    SPARCODE_HOME=<home> .venv/bin/python experiments/scripts/logit_scale_probe.py \\
        --runs <the target matrix's runs> --encoder dnn --seeds 0,1,2 --out <new folder>
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patched_training import parser, report, train_all, worker  # noqa: E402
from sparcode_ablation import target_sets  # noqa: E402

from sparcode_cli.models.sparcode import SparCode  # noqa: E402


def freeze_scale() -> None:
    init = SparCode.__init__

    def frozen(self: SparCode, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.log_logit_scale.requires_grad_(False)

    SparCode.__init__ = frozen  # type: ignore[method-assign]


def main() -> None:
    if worker(freeze_scale):
        return
    a = parser(__doc__).parse_args()
    tts, seeds, new, ref = train_all(__file__, a, "FIXED_SCALE", lambda s, tt: ("fixed", {}))
    print(
        f"{a.dataset}, {a.encoder}, seeds {seeds}; every run: {' '.join(target_sets(a.dataset, 'sparcode'))}\n"
    )
    report(
        "logit scale",
        [("learned from 1.0 (default)", ref), ("fixed at 1.0", new)],
        [("two-tower", [tts[s] for s in seeds])],
        seeds,
    )


if __name__ == "__main__":
    main()
