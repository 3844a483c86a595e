"""One typed, validated configuration object, loaded from YAML with ``--set`` overrides.

Every key is documented in ``conf/default.yaml``. Unknown keys are rejected with the key's
dotted name and the valid names beside it. Each stage receives only its own section.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mfsim.pipeline import registry
from mfsim.pipeline.errors import MfsimError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "default.yaml"


class Section(BaseModel):
    """A config section: unknown keys rejected, values validated on assignment too."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class RunSection(Section):
    """``run``: the output root and the run id."""

    output: str = "runs"
    run_id: str | None = None


class InputSection(Section):
    """``input``: the interaction log and its column names."""

    path: str | None = None
    user_col: str = "user_id"
    item_col: str = "item_id"
    weight_col: str | None = "weight"
    ts_col: str | None = "ts"


class ClusterSection(Section):
    """``cluster``: a scheduler address, or the embedded local cluster's size."""

    address: str | None = None
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    processes: bool = True
    memory_limit: str = "auto"
    dashboard_address: str | None = "127.0.0.1:0"


class IngestSection(Section):
    """``ingest``: time window, invalid rows, minimum support, block and piece sizes."""

    as_of: dt.datetime | None = None
    window_days: float | None = Field(None, gt=0)
    on_invalid: Literal["error", "drop"] = "error"
    min_user_interactions: int = Field(1, ge=1)
    min_item_interactions: int = Field(1, ge=1)
    block_rows: int = Field(65536, ge=1)
    partition_rows: int = Field(2_000_000, ge=1)


class SimulateSection(Section):
    """``simulate``: the paper's Section 4 simulation (clusters, power-law popularity and activity)."""

    n_users: int = Field(20_000, ge=1)
    n_items: int = Field(1_000, ge=2)
    n_clusters: int = Field(5, ge=1)
    cluster_probs: list[float] | None = None
    item_beta_low: float = 0.25
    item_beta_high: float = 1.5
    user_beta: float = 0.5
    min_items_per_user: int = Field(1, ge=1)
    max_items_per_user: int | None = None
    user_pref_concentration: float = Field(1.0, gt=0)
    n_days: int = Field(30, ge=1)
    start_date: dt.date = dt.date(2024, 1, 1)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "SimulateSection":
        if self.cluster_probs is not None:
            if len(self.cluster_probs) != self.n_clusters:
                raise ValueError(
                    f"simulate.cluster_probs has {len(self.cluster_probs)} entries but "
                    f"simulate.n_clusters is {self.n_clusters}; give one probability per cluster"
                )
            if any(p < 0 for p in self.cluster_probs) or sum(self.cluster_probs) <= 0:
                raise ValueError("simulate.cluster_probs must be non-negative with a positive sum")
        if self.item_beta_low > self.item_beta_high:
            raise ValueError("simulate.item_beta_low must not exceed simulate.item_beta_high")
        return self


class PreprocessSection(Section):
    """``preprocess``: normalization before learning (binarize, IDF/BM25, popularity power, standardize)."""

    binarize: bool = False
    column_weighting: Literal["none", "idf", "bm25", "popularity_power"] = "none"
    bm25_k1: float = Field(1.2, ge=0)
    bm25_b: float = Field(0.75, ge=0, le=1)
    popularity_beta: float = 0.75
    center_columns: bool = False
    standardize_columns: bool = False


class SvdSection(Section):
    """``svd``: rank k, solver and the randomized range finder's parameters."""

    rank: int = Field(64, ge=1)
    solver: Literal["mfsim", "sklearn"] = "mfsim"
    oversample: int = Field(10, ge=0)
    power_iterations: int = Field(32, ge=0)
    seed: int = 0


class CustomScaling(Section):
    """``objectives.eq1.custom``: the exponents (alpha, beta) of the ``custom`` Eq. 1 scaling."""

    alpha: float = 0.5
    beta: float = 0.0


class Eq1Section(Section):
    """``objectives.eq1``: lambda of Eq. 1 and the scalings (choices of D) to produce."""

    lambda_: float = Field(10.0, alias="lambda", ge=0)
    scalings: list[str] = ["symmetric", "item_orthonormal", "user_orthonormal", "eq2_like"]
    custom: CustomScaling = CustomScaling()

    @field_validator("scalings")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        if len(registry.check_names(v, registry.EQ1_SCALINGS, "eq1 scaling")) != len(v):
            raise ValueError(f"objectives.eq1.scalings lists a name twice: {v}")
        return v


class Eq2Section(Section):
    """``objectives.eq2``: lambda of Eq. 2."""

    lambda_: float = Field(10.0, alias="lambda", ge=0)


class ObjectivesSection(Section):
    """``objectives``: which of Eq. 1 and Eq. 2 to fit (null skips one)."""

    eq1: Eq1Section | None = Eq1Section()
    eq2: Eq2Section | None = Eq2Section()


class NeighboursSection(Section):
    """``neighbours``: list length, the metrics of each list kind, users, task and tile sizes."""

    top_n: int = Field(100, ge=1)
    item_item: list[str] = list(registry.metrics_of("item_item"))
    user_item: list[str] = list(registry.metrics_of("user_item"))
    user_user: list[str] = list(registry.metrics_of("user_user"))
    users: list[Any] | None = None
    query_chunk: int = Field(2048, ge=1)
    candidate_block: int = Field(4096, ge=1)

    @field_validator("item_item", "user_item", "user_user")
    @classmethod
    def _metrics(cls, v: list[str], info) -> list[str]:
        return registry.check_names(v, registry.metrics_of(info.field_name), "metric")


class EvaluationSection(Section):
    """``evaluation``: the held-out split, cutoffs and the item truth for cluster precision."""

    holdout: Literal["none", "random", "temporal"] = "random"
    fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    cutoffs: list[int] = [10, 20, 100]
    item_truth: str | None = None
    truth_cluster_col: str = "cluster"
    truth_popularity_col: str | None = "popularity"

    @field_validator("cutoffs")
    @classmethod
    def _cutoffs(cls, v: list[int]) -> list[int]:
        if not v or any(c < 1 for c in v):
            raise ValueError(f"evaluation.cutoffs must be a non-empty list of integers >= 1, got {v}")
        return sorted(set(v))


class AuditSection(Section):
    """``audit``: random rescalings of the cosine audit and its list length."""

    enabled: bool = True
    draws: int = Field(5, ge=0)
    spread: float = Field(1.0, gt=0)
    top_n: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)
    least_stable: int = Field(20, ge=0)


class ReportSection(Section):
    """``report``: whether to draw the run report and how many items its heatmaps show."""

    enabled: bool = True
    heatmap_items: int = Field(1000, ge=2)


class Config(Section):
    """The whole configuration: one validated object, one section per stage."""

    run: RunSection = RunSection()
    input: InputSection = InputSection()
    cluster: ClusterSection = ClusterSection()
    ingest: IngestSection = IngestSection()
    simulate: SimulateSection = SimulateSection()
    preprocess: PreprocessSection = PreprocessSection()
    svd: SvdSection = SvdSection()
    objectives: ObjectivesSection = ObjectivesSection()
    neighbours: NeighboursSection = NeighboursSection()
    evaluation: EvaluationSection = EvaluationSection()
    audit: AuditSection = AuditSection()
    report: ReportSection = ReportSection()

    def resolved(self) -> dict[str, Any]:
        """The configuration as plain JSON-able data, with the YAML key names."""
        return self.model_dump(mode="json", by_alias=True)


# ---------------------------------------------------------------------------------------------
# loading


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at ``loc`` (for listing valid names)."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = None
        for name, info in current.model_fields.items():
            if part in (name, info.alias):
                field = info
                break
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", None)
        if args:  # Optional[Model]
            ann = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        current = ann
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def _field_names(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per pydantic error, naming the dotted key, the source file and the valid keys."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            owner = _model_at(Config, loc)
            valid = ", ".join(_field_names(owner)) if owner else "see conf/default.yaml"
            lines.append(f"unknown config key '{key}' in {source}; valid keys here: {valid}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"invalid config key '{key}' in {source}: {msg} (got {e.get('input')!r})")
    return "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in text:
        raise MfsimError(f"--set expects dotted.key=value, got {text!r} (example: --set svd.rank=32)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise MfsimError(f"--set has an empty key in {text!r} (example: --set svd.rank=32)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise MfsimError(f"--set {key}: value {raw!r} is not valid YAML ({exc.__class__.__name__})") from exc
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--set a.b=value`` overrides to the raw YAML mapping (sections created as needed)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise MfsimError(f"--set {'.'.join(path)}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """The YAML mapping of a config file; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise MfsimError(f"config file {p} does not exist; pass a YAML file such as conf/default.yaml")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MfsimError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise MfsimError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (default: conf/default.yaml), apply ``--set`` overrides, validate."""
    source = str(path) if path is not None else str(DEFAULT_CONFIG)
    data = read_yaml(source)
    data = apply_overrides(data, list(overrides or []))
    return validate_config(data, source)


def validate_config(data: dict, source: str = "config") -> Config:
    """A ``Config`` from a raw mapping; one ``MfsimError`` naming every bad key of ``source``."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise MfsimError(format_validation_error(err, source)) from None
