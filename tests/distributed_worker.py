"""Run by tests/test_distributed.py under `torchrun --nproc-per-node 2` (gloo, CPU): training, resume, the
sharded index build and sharded evaluation on the checkerboard data; every rank leaves what it saw in OUT.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py OUT
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparcode_cli import distributed as dd  # noqa: E402
from sparcode_cli.config import load_config  # noqa: E402
from sparcode_cli.errors import UserError  # noqa: E402
from sparcode_cli.evaluation import evaluate_index, evaluate_run  # noqa: E402
from sparcode_cli.indexing import build_index  # noqa: E402
from sparcode_cli.models.sparcode import SparCode  # noqa: E402
from sparcode_cli.models.two_tower import TwoTower  # noqa: E402
from sparcode_cli.training.trainer import train  # noqa: E402
from tests.synthetic import checkerboard  # noqa: E402

# 63 rows: the ranks' slices differ (32 / 31), so the slice weighting of the loss is exercised
COMMON = [
    "model.dim=16",
    "model.emb_dim=16",
    "model.hidden=32",
    "model.max_history=8",
    "model.dropout=0.0",
    "train.batch_size=63",
    "train.n_negatives=32",
    "train.negatives=mixed",
    "train.lr=0.01",
    "train.threads=1",
    "train.epochs=2",
]
TWO_TOWER = [*COMMON]
# from scratch, quantized after 3 steps (k-means of a gathered batch), restarts forced by a high threshold
SPARCODE = [
    *COMMON,
    "model.token_dim=16",
    "model.n_codewords=8",
    "model.quantize_after=3",
    "model.density_warmup=10",
    "model.dead_threshold=0.9",
]


# the codebooks alone evolve (k-means, EMA, restarts): Adam's step, lr x (gradient / |gradient|), would turn
# float noise in a gradient that is ~0 (a constant that the row standardisation removes) into lr-sized steps
FROZEN = ["train.lr=1e-9"]


def cfg(model: str, *extra: str) -> dict:
    return load_config(model, overrides=[*(TWO_TOWER if model == "two-tower" else SPARCODE), *extra])


def quiet_train(ds, config, out, **kw):
    return train(ds, config, out, console=Console(file=io.StringIO()), progress=False, **kw)


def main(out: Path) -> None:
    assert dd.init_from_env() and dd.world_size() == 2
    r = dd.rank()
    ds = checkerboard()
    seen: dict[str, object] = {}

    # every step's model state (parameters, codebooks and their statistics), digested, per rank
    digests: dict[str, list[str]] = {"two-tower": [], "sparcode": []}

    def recording(cls: type) -> None:
        after = cls.after_step

        def after_step(self) -> None:
            after(self)
            blob = b"".join(t.detach().cpu().numpy().tobytes() for t in self.state_dict().values())
            digests[self.name].append(hashlib.sha256(blob).hexdigest())

        cls.after_step = after_step

    recording(SparCode)
    recording(TwoTower)

    tt = quiet_train(ds, cfg("two-tower"), out / "runs")
    seen["two_tower"] = {"run": str(tt.run_dir), "test": tt.test, "valid": tt.valid, "steps": tt.steps}
    sc = quiet_train(ds, cfg("sparcode"), out / "runs")
    seen["sparcode"] = {"run": str(sc.run_dir), "test": sc.test, "steps": sc.steps}

    frozen = quiet_train(ds, cfg("sparcode", *FROZEN), out / "runs")
    seen["sparcode_frozen"] = {"run": str(frozen.run_dir), "test": frozen.test, "steps": frozen.steps}
    part = quiet_train(ds, cfg("sparcode"), out / "resume", stop_at_step=7)
    assert part.status == "stopped"
    done = quiet_train(ds, cfg("sparcode"), out / "resume", resume=True)
    seen["resumed"] = {"run": str(done.run_dir), "test": done.test, "steps": done.steps}

    build_index(sc.run_dir, out / "index", ds=ds, codes="all", progress=False)
    seen["index_eval"] = evaluate_index(out / "index", ds, write=False, progress=False)
    seen["run_eval"] = evaluate_run(tt.run_dir, ds, write=False, progress=False, batch_size=16)
    seen["failed_build"] = failed_build(sc.run_dir, out / "failed", ds)
    seen["digests"] = digests
    (out / f"rank{r}.json").write_text(json.dumps(seen, default=str))
    dd.barrier()


def failed_build(run_dir: Path, out: Path, ds) -> str:
    """Rank 1 fails while scoring its shard: every rank must raise, and nothing may be published."""
    from sparcode_cli import indexing

    real = indexing.build_code_index

    def failing(*a, **kw):
        if dd.rank() == 1:
            raise UserError("the shard's scoring failed (injected)")
        return real(*a, **kw)

    indexing.build_code_index = failing
    try:
        build_index(run_dir, out, ds=ds, codes="all", progress=False)
    except UserError as exc:
        return str(exc)
    finally:
        indexing.build_code_index = real
    return "no error"


if __name__ == "__main__":
    main(Path(sys.argv[1]))
