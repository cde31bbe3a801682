"""torch.distributed for every layer: training, index build and evaluation under `torchrun` (DESIGN §7).

    torchrun --nproc-per-node=2 -m sparcode_cli train --dataset movielens --model sparcode
    sparcode train --nproc 2 ...        # the same launcher (torch.distributed.run), started for you

`init_from_env()` joins the process group that `torchrun` describes in the environment (RANK, WORLD_SIZE,
MASTER_ADDR, ...): gloo on CPU, nccl when CUDA is used. Without those variables, or at a world size of 1,
nothing is initialised and every helper here is a no-op that returns its input, so one process runs exactly
the code it always ran.

Conventions: rank 0 alone writes files; work is split into contiguous shards (`shard`), and every collective
is called by every rank in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from sparcode_cli.errors import UserError

T = TypeVar("T")

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True in a process that torchrun started as one of several."""
    return all(v in os.environ for v in LAUNCH_VARS) and int(os.environ["WORLD_SIZE"]) > 1


def init_from_env() -> bool:
    """Join the torchrun process group once (gloo, or nccl when CUDA is available). True when distributed."""
    if not launched():
        return False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def shard(n: int, r: int | None = None, size: int | None = None) -> tuple[int, int]:
    """[lo, hi) of rank r's contiguous part of n things; the first n % size ranks get one more."""
    r = rank() if r is None else r
    size = world_size() if size is None else size
    base, extra = divmod(int(n), size)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm(t: torch.Tensor) -> torch.Tensor:
    """Where a collective can take `t`: nccl needs CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return t.cuda()
    return t


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (every rank gets the same bits)."""
    if is_distributed():
        c = _comm(t)
        dist.all_reduce(c)
        if c is not t:
            t.copy_(c)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s value on every rank, in place."""
    if is_distributed():
        c = _comm(t)
        dist.broadcast(c, src)
        if c is not t:
            t.copy_(c)
    return t


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The ranks' tensors concatenated along dim 0 in rank order (their first dims may differ)."""
    if not is_distributed():
        return t
    n = _comm(torch.tensor([t.shape[0]], dtype=torch.long, device=t.device))
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    top = max(counts)
    padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    padded = _comm(padded)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).to(t.device)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's (picklable) object, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: Any) -> list[Any] | None:
    """Every rank's object on rank 0 (in rank order); None on the others."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def agreed(fn: Callable[[], T]) -> T:
    """fn() on every rank; when it raised on any rank, every rank raises, so no rank waits on a collective the
    failed one never reaches and rank 0 never publishes a half-built result. The failed rank re-raises its own
    error; the others raise a UserError that names it."""
    if not is_distributed():
        return fn()
    try:
        result, failure = fn(), None
    except UserError as exc:
        own, failure = exc, str(exc)
    except Exception as exc:  # a bug: the failed rank keeps its traceback
        own, failure = exc, f"{type(exc).__name__}: {exc}"
    failures = all_gather_object(failure)
    if failure is not None:
        raise own
    bad = [(r, f) for r, f in enumerate(failures) if f is not None]
    if bad:
        r, msg = bad[0]
        raise UserError(f"rank {r} of {world_size()} failed: {msg}", "the job stops; nothing was published")
    return result


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (a download, preprocessing into the shared cache), then the other ranks,
    which find its result there."""
    if is_distributed() and not is_main():
        barrier()
    try:
        yield
    finally:
        if is_distributed() and is_main():
            barrier()
