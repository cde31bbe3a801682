"""The two-tower a SparCode run starts from, kept frozen beside it: the targets of `model.distill`.

SparCode's warm start copies the two-tower's encoders and then trains them; the teacher keeps the copy as it
was, so its scores stay those of the two-tower run (on SparCode's queries: its `max_history` window). It is built with the model (same encoder config, under a
forked RNG so it draws nothing from the run's random stream), filled by `load_two_tower`, always in eval mode
(no dropout) and never trained (no parameter requires a gradient); it travels inside the checkpoint so a
resumed run has it, and serving never reads it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparcode_cli.models.base import DataContext, QueryBatch
from sparcode_cli.models.encoders import ItemEncoder, build_query_encoder


class TwoTowerTeacher(nn.Module):
    def __init__(self, cfg: dict[str, Any], ctx: DataContext) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            self.query_encoder = build_query_encoder(cfg, ctx)
            self.item_encoder = ItemEncoder(cfg, ctx)
        self.register_buffer("inv_temperature", torch.tensor(1.0))
        self.register_buffer("cosine", torch.tensor(True))
        self.register_buffer("ready", torch.tensor(False))  # True once a two-tower's weights are in
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> TwoTowerTeacher:
        return super().train(False)  # never dropout: the targets are the run's eval-mode scores

    def load_two_tower(self, ckpt: dict[str, Any]) -> None:
        """The encoders, similarity and temperature of a two-tower checkpoint (shapes checked by the caller's
        `_copy_two_tower`)."""
        sd = ckpt["state_dict"]
        for prefix, module in (("query_encoder.", self.query_encoder), ("item_encoder.", self.item_encoder)):
            module.load_state_dict({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)})
        mc = dict(ckpt.get("config") or {})
        if isinstance(mc.get("model"), dict):  # a full resolved config: its [model] section
            mc = dict(mc["model"])
        cosine = str(mc.get("similarity", "cosine")) == "cosine"
        self.cosine.fill_(cosine)
        self.inv_temperature.fill_(1.0 / float(mc.get("temperature", 0.1 if cosine else 1.0)))
        self.ready.fill_(True)

    @torch.no_grad()
    def logits(self, q: QueryBatch, pos: Tensor, neg: Tensor) -> Tensor:
        """(B, 1 + S): the two-tower's training logits of each row's positive, then of the shared negatives."""
        qv, iv = self.query_encoder(q), self.item_encoder(torch.cat([pos, neg]))
        if bool(self.cosine):
            qv, iv = F.normalize(qv, dim=-1), F.normalize(iv, dim=-1)
        b = len(pos)
        return torch.cat([(qv * iv[:b]).sum(-1, keepdim=True), qv @ iv[b:].T], 1) * self.inv_temperature
