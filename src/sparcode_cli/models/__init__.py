"""The model registry, and checkpoints: one dict that carries its config (nanoGPT style).

    model = build_model("two-tower", cfg["model"], DataContext.from_dataset(ds))
    attach_features(model, ds.features)          # item feature tables into every ItemEncoder
    save_checkpoint(path, make_checkpoint(model, cfg, step=10))
    model = model_from_checkpoint(load_checkpoint(path))

A checkpoint (loadable with `torch.load(path, weights_only=True)`: only tensors, dicts, lists, str, int,
float, bool, None) holds:

    format        1
    model         registered name, e.g. "two-tower"
    config        the full resolved config {"data": .., "model": .., "train": ..}
    ctx           DataContext.to_dict() (sizes the model is built with)
    state_dict    model weights and buffers (item feature tables included)
    optimizer     optimizer state_dict, or None
    epoch, batch, step       training position: `epoch` epochs done + `batch` batches of the next one
    rng           {"torch": ByteTensor, "numpy": {...}, "python": [...]}, or None
    best_metric, best_epoch, bad_evals, history, data_hash, dataset, run_id, init_from, train_time_s, ...
"""

from __future__ import annotations

import importlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparcode_cli.atomic import atomic_path
from sparcode_cli.errors import UserError
from sparcode_cli.models.base import DataContext, Recommender

MODELS: dict[str, str] = {
    "popularity": "sparcode_cli.models.popularity:Popularity",
    "two-tower": "sparcode_cli.models.two_tower:TwoTower",
    "sparcode": "sparcode_cli.models.sparcode:SparCode",
    "all-to-all": "sparcode_cli.models.all_to_all:AllToAll",
}

CHECKPOINT_FORMAT = 1


def model_class(name: str) -> type[Recommender]:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}", hint=f"models: {', '.join(MODELS)}")
    module, attr = MODELS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def build_model(name: str, model_cfg: dict[str, Any], ctx: DataContext) -> Recommender:
    return model_class(name)(dict(model_cfg), ctx)


def attach_features(model: torch.nn.Module, features: Any) -> None:
    """Copy the dataset's item feature tables into every ItemEncoder of the model."""
    from sparcode_cli.models.encoders import ItemEncoder

    for m in model.modules():
        if isinstance(m, ItemEncoder):
            m.set_features(features.item_genres, features.item_year)


# -- RNG state as plain containers (weights_only-safe) ---------------------------------------------------


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [int(py_state[0]), [int(x) for x in py_state[1]], py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- checkpoints -----------------------------------------------------------------------------------------


def make_checkpoint(
    model: Recommender,
    config: dict[str, Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    with_rng: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    ckpt: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model": model.name,
        "config": config,
        "ctx": model.ctx.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_state() if with_rng else None,
    }
    ckpt.update(extra)
    return ckpt


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> None:
    """Written to a temporary name and renamed: an interrupted save leaves the previous checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}", hint="give a run folder or a checkpoint_*.pt file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise UserError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path} is not a sparcode checkpoint")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], device: str | torch.device = "cpu") -> Recommender:
    """Rebuild the model from the config inside the checkpoint and load its weights (eval mode)."""
    model = build_model(ckpt["model"], ckpt["config"]["model"], DataContext.from_dict(ckpt["ctx"]))
    sd = ckpt["state_dict"]
    # feature tables are buffers whose shape depends on the data: resize before loading
    own = dict(model.named_buffers())
    for key, value in sd.items():
        if key in own and own[key].shape != value.shape:
            _set_buffer(model, key, value.clone())
    model.load_state_dict(sd)
    return model.to(device).eval()


def _set_buffer(model: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    *parents, leaf = key.split(".")
    mod = model
    for p in parents:
        mod = getattr(mod, p)
    setattr(mod, leaf, value)
