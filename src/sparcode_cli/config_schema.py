"""Declared type and valid range of every config key and of the `sparcode index` / `sparcode eval` options.

The default values live in experiments/<model>.toml and config.BASE; here every key gets its type, its
bounds or choices, and the rules that tie several keys together (one pydantic model per section, and per
model for [model]). `config.load_config` calls `check_config` on every resolved config, and the index / eval
commands call `check_options` first, so a bad value is one UserError (exit code 2) naming each bad key, the
value given and what is allowed, before anything is prepared, built or written:

    model.k_u = 0 is not allowed: must be an integer >= 1

A key in a defaults file without a declaration here (or a declared key without a default) is an error too.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Self, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from sparcode_cli.errors import UserError

DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"  # what devices.resolve_device accepts

MAX_CODE_IDS = 2**63  # code ids are int64
MAX_PROBES = 64  # multi-probe serving: a beam of probes x N candidates per stage and token


class Section(BaseModel):
    """One section's declarations. Values arrive already coerced to their default's type (config._coerce), so
    strict typing only catches a defaults file that disagrees with its declaration."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    def cross_key_problems(self) -> list[str]:
        """One message per broken rule that ties several keys together (each names its keys and values)."""
        return []

    @model_validator(mode="after")
    def _cross_keys(self) -> Self:
        problems = self.cross_key_problems()
        if problems:
            raise PydanticCustomError("cross_key", "{problems}", {"problems": "\n".join(problems)})
        return self


# -- [data] and [train]: the same for every model ------------------------------------------------------------


class DataConfig(Section):
    split: Literal["default", "time", "users", "given"]
    min_count: Annotated[int, Field(ge=0)] | Literal["default"]  # 0 = no k-core filter
    rating_threshold: float | Literal["default"]
    max_history: int = Field(ge=1)
    seed: int = Field(ge=0)  # numpy's default_rng refuses negative seeds


class TrainConfig(Section):
    seed: int = Field(ge=0)
    epochs: int = Field(ge=1)
    max_steps: int = Field(ge=0)  # 0 = no step budget
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    negatives: Literal["uniform", "in-batch", "mixed"]
    n_negatives: int = Field(ge=1)
    logq: bool
    patience: int = Field(ge=0)  # 0 = no early stopping
    eval_every_epochs: int = Field(ge=1)
    eval_batch_size: int = Field(ge=1)
    device: str = Field(pattern=DEVICE_PATTERN)
    threads: int = Field(ge=0)  # 0 = torch's default
    grad_clip: float = Field(ge=0)  # 0 = off


# -- [model]: one model per registered model ------------------------------------------------------------------


class ModelSection(Section):
    """Keys every model has."""

    name: str
    max_history: int = Field(ge=1)


class PopularityConfig(ModelSection):
    pass


class EncoderConfig(ModelSection):
    """The shared query and item encoders (models/encoders.py)."""

    query_encoder: Literal["dnn", "sasrec", "gru4rec"]
    dim: int = Field(ge=1)
    emb_dim: int = Field(ge=1)
    tower: Literal["mlp", "embedding"]
    hidden: int = Field(ge=0)  # 0: each tower is one linear layer
    dropout: float = Field(ge=0, lt=1)
    sasrec_layers: int = Field(ge=1)
    sasrec_heads: int = Field(ge=1)
    gru_layers: int = Field(ge=1)
    user_id: bool
    history: bool

    def cross_key_problems(self) -> list[str]:
        problems = super().cross_key_problems()
        if self.query_encoder == "sasrec" and self.emb_dim % self.sasrec_heads:
            problems.append(
                f"model.emb_dim = {self.emb_dim} is not allowed with model.sasrec_heads = {self.sasrec_heads}: "
                "must be a multiple of sasrec_heads (the sasrec encoder splits emb_dim over its attention heads)"
            )
        if not self.history and (self.query_encoder != "dnn" or not self.user_id):
            problems.append(
                f"model.history = false is not allowed with model.query_encoder = {self.query_encoder!r} and "
                f"model.user_id = {str(self.user_id).lower()}: needs the dnn encoder and user_id = true (a query "
                "without its history is the user-ID embedding and user features)"
            )
        if self.tower == "embedding" and self.dim != self.emb_dim:
            problems.append(
                f'model.dim = {self.dim} is not allowed with model.tower = "embedding" and model.emb_dim = '
                f"{self.emb_dim}: must equal emb_dim (an embedding tower has no map: its output is its summed "
                "embeddings)"
            )
        return problems


class TwoTowerConfig(EncoderConfig):
    similarity: Literal["cosine", "dot"]
    temperature: float = Field(gt=0)


class TokenCrossConfig(EncoderConfig):
    """Token heads and the interaction g shared by sparcode and all-to-all (models/interaction.py)."""

    k_u: int = Field(ge=1)
    k_i: int = Field(ge=1)
    token_dim: int = Field(ge=1)
    normalize: bool
    interaction: Literal["mlp", "attention"]
    interaction_hidden: int = Field(ge=1)
    interaction_layers: int = Field(ge=1)
    tau: float = Field(gt=0)
    zero_cross: bool
    head_noise: float = Field(ge=0)


class AllToAllConfig(TokenCrossConfig):
    pass


class SparCodeConfig(TokenCrossConfig):
    quantizer: Literal["residual"]  # the only one left: the product quantizer lost its ablation
    m: int = Field(ge=1)
    n_codewords: int = Field(ge=2)
    beta: float = Field(ge=0)
    ema_decay: float = Field(ge=0, le=1)  # 1 keeps the k-means codebooks
    dead_threshold: float = Field(ge=0)  # 0 = never restart a code
    kmeans_iters: int = Field(ge=0)  # 0 = codebooks from random batch tokens
    quantize_after: int = Field(ge=0)
    target_density: float = Field(gt=0, le=1)
    density_warmup: int = Field(ge=0)
    density_items: int = Field(ge=2)  # a row's std over the probe items needs two of them
    leak: float = Field(ge=0, le=1)  # a backward slope below the cut, at most the slope above it
    leak_steps: int = Field(ge=0)
    logit_scale: float = Field(gt=0, le=100)  # the learned scale is clamped at 100
    distill: float = Field(ge=0)  # 0 = no teacher
    probes: int = Field(ge=1, le=MAX_PROBES)  # serving: code ids read per user token

    def cross_key_problems(self) -> list[str]:
        problems = super().cross_key_problems()
        if self.probes > self.n_codewords**self.m:
            problems.append(
                f"model.probes = {self.probes} is not allowed with model.n_codewords = {self.n_codewords} and "
                f"model.m = {self.m}: must be at most n_codewords^m, the number of code ids"
            )
        if self.n_codewords**self.m >= MAX_CODE_IDS:
            problems.append(
                f"model.n_codewords = {self.n_codewords} with model.m = {self.m} is not allowed: "
                f"n_codewords^m must be < 2^63 (code ids are int64)"
            )
        return problems


MODEL_CONFIGS: dict[str, type[ModelSection]] = {
    "popularity": PopularityConfig,
    "two-tower": TwoTowerConfig,
    "sparcode": SparCodeConfig,
    "all-to-all": AllToAllConfig,
}
SECTION_CONFIGS: dict[str, type[Section]] = {"data": DataConfig, "train": TrainConfig}


# -- `sparcode index` and `sparcode eval` options (None: not given) ------------------------------------------

PositiveInt = Annotated[int, Field(ge=1)]


class IndexOptions(Section):
    bias: float | None
    probes: Annotated[int, Field(ge=1, le=MAX_PROBES)] | None
    max_per_code: PositiveInt | None
    scores: Literal["float32", "float16", "uint8"] | None
    codes: Literal["auto", "reached", "all"] | None
    faiss: Literal["flat", "ivf", "hnsw"] | None
    nlist: PositiveInt | None
    nprobe: int = Field(ge=1)
    hnsw_m: int = Field(ge=2)  # Faiss HNSW crashes (segfault) with 1 link per node
    ef_construction: int = Field(ge=1)
    ef_search: int = Field(ge=1)
    memory_budget_mb: float = Field(gt=0)
    threads: PositiveInt | None
    device: str = Field(pattern=DEVICE_PATTERN)


class EvalOptions(Section):
    split: Literal["test", "valid"]
    threads: PositiveInt | None
    latency_queries: int = Field(ge=0)
    exact_users: int = Field(ge=0)
    device: str | None = Field(pattern=DEVICE_PATTERN)
    probes: Annotated[int, Field(ge=1, le=MAX_PROBES)] | None


# -- checking -----------------------------------------------------------------------------------------------


def check_config(cfg: dict[str, Any]) -> None:
    """Raise one UserError listing every key of a resolved config whose value is not allowed."""
    name = cfg["model"]["name"]
    if name not in MODEL_CONFIGS:
        raise UserError(f"model {name!r} has no declared [model] keys (MODEL_CONFIGS in {__name__})")
    problems = [
        *_problems(SECTION_CONFIGS["data"], cfg["data"], lambda k: f"data.{k}"),
        *_problems(SECTION_CONFIGS["train"], cfg["train"], lambda k: f"train.{k}"),
        *_problems(MODEL_CONFIGS[name], cfg["model"], lambda k: f"model.{k}"),
    ]
    _raise(problems, "config values are")


def check_options(schema: type[Section], values: dict[str, Any]) -> None:
    """Raise one UserError listing every command-line option (`max_per_code` -> --max-per-code) not allowed."""
    _raise(_problems(schema, values, lambda k: "--" + k.replace("_", "-")), "options are")


def _raise(problems: list[str], what: str) -> None:
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{len(problems)} {what} not allowed:\n  " + "\n  ".join(problems))


def _problems(schema: type[Section], values: dict[str, Any], name_of: Callable[[str], str]) -> list[str]:
    try:
        schema.model_validate(values)
    except ValidationError as exc:
        out: list[str] = []
        seen: set[str] = set()
        for err in exc.errors():
            if err["type"] == "cross_key":
                out += err["ctx"]["problems"].split("\n")
                continue
            key = str(err["loc"][0])
            if key in seen:  # a union type reports each of its members
                continue
            seen.add(key)
            out.append(_explain(schema, key, values, err["type"], name_of(key)))
        return out
    return []


def _explain(schema: type[Section], key: str, values: dict[str, Any], kind: str, name: str) -> str:
    where = f"{schema.__name__} in {__name__}"
    if kind == "extra_forbidden":
        return f"{name} has no declaration: every key needs a type and range in {where}"
    if kind == "missing":
        return f"{name} is declared in {where} but has no default value"
    spec = key_spec(schema.model_fields[key])
    if spec.choices and not spec.also:
        return f"{name} = {values[key]!r} is not one of: {', '.join(spec.choices)}"
    return f"{name} = {values[key]!r} is not allowed: must be {spec.describe()}"


# -- reading a declaration back (for messages and for the tests generated from the declarations) ------------


@dataclass(frozen=True)
class KeySpec:
    """What one declared key accepts."""

    kind: type  # int, float, bool or str
    bounds: dict[str, float] = field(default_factory=dict)  # "ge" / "gt" / "le" / "lt" -> bound
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    also: tuple[str, ...] = ()  # literals accepted besides the type, e.g. "default"

    def describe(self) -> str:
        """In words: 'an integer >= 1', 'a finite number > 0 and <= 1', 'one of: dnn, sasrec, gru4rec'."""
        if self.choices:
            text = "one of: " + ", ".join(self.choices)
        else:
            kinds = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}
            ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
            limits = " and ".join(f"{ops[op]} {bound}" for op, bound in self.bounds.items())
            text = " ".join(filter(None, [kinds[self.kind], limits]))
            if self.pattern:
                text += f" matching {self.pattern}"
        return text + "".join(f' or "{v}"' for v in self.also)


def key_spec(info: FieldInfo) -> KeySpec:
    """The type, bounds and choices a pydantic field declares (Literal, bounds via Field, `| Literal[...]`,
    `| None`)."""
    tp, meta, also = info.annotation, list(info.metadata), ()
    if get_origin(tp) in (Union, types.UnionType):
        members = [a for a in get_args(tp) if a is not type(None)]
        rest = [a for a in members if get_origin(a) is not Literal]
        if len(rest) == 1 and len(members) > 1:  # e.g. int | Literal["default"]
            also = tuple(v for a in members if get_origin(a) is Literal for v in get_args(a))
        elif len(members) > 1:
            raise TypeError(f"unsupported declaration {info.annotation}")
        tp = rest[0] if rest else members[0]
    if get_origin(tp) is Annotated:
        tp, *extra = get_args(tp)
        meta += [m for f in extra for m in (f.metadata if isinstance(f, FieldInfo) else [f])]
    if get_origin(tp) is Literal:
        return KeySpec(str, choices=tuple(get_args(tp)), also=also)
    bounds = {op: getattr(m, op) for m in meta for op in ("ge", "gt", "le", "lt") if hasattr(m, op)}
    pattern = next((m.pattern for m in meta if getattr(m, "pattern", None)), None)
    return KeySpec(tp, bounds, pattern=pattern, also=also)
