"""One typed, validated configuration object, loaded from YAML with ``--set`` overrides.

Every key is documented in ``conf/default.yaml``. Unknown keys are rejected with the key's
dotted name and the valid names beside it. Each stage receives only its own section.

Values are checked strictly: a YAML ``true`` is not the integer 1, and ``1.5`` is not an integer
(a float key takes an integer). Dates and times (``ingest.as_of``, ``simulate.start_date``) also
take ISO 8601 strings. YAML is read with a safe loader (``ConfigLoader``) that builds plain values
only, rejects a key given twice in one mapping, and reads ``1e-3`` as a number, as YAML 1.2 does.
Every error names its source: the config file, or the ``--set`` override that set the key.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from mfsim.pipeline import registry
from mfsim.pipeline.errors import MfsimError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "default.yaml"


class Section(BaseModel):
    """A config section: unknown keys rejected, strict types, values validated on assignment too.

    Strict: no bool is taken for an int (``--set svd.rank=true`` is an error, not rank 1) and no
    string for a number; an int is taken for a float. Date fields opt out (``_LAX``) so that ISO
    8601 strings, from YAML or from a resolved config read back from JSON, still parse.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True, strict=True)


# A date or time field parses ISO 8601 strings (and a date for a datetime: its midnight).
_LAX = {"strict": False}


class RunSection(Section):
    """``run``: the output root, the run id, nightly retention, and the heartbeat of a running run."""

    output: str = "runs"
    run_id: str | None = None
    keep_last: int | None = Field(None, ge=1)
    heartbeat_s: float = Field(10.0, gt=0)
    lost_after_s: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _lost_after_heartbeat(self) -> "RunSection":
        if self.lost_after_s <= self.heartbeat_s:
            raise ValueError(f"run.lost_after_s ({self.lost_after_s:g}) must exceed run.heartbeat_s "
                             f"({self.heartbeat_s:g}): a run shows as lost only when its heartbeat is older "
                             "than lost_after_s")
        return self


class InputSection(Section):
    """``input``: the interaction log and its column names."""

    path: str | None = None
    user_col: str = "user_id"
    item_col: str = "item_id"
    weight_col: str | None = "weight"
    ts_col: str | None = "ts"


class TlsSection(Section):
    """``cluster.tls``: PEM files for a TLS connection to a remote scheduler (``tls://HOST:PORT``).

    ``ca_file`` is the CA that signed the scheduler's and workers' certificates, ``cert_file`` and
    ``key_file`` this client's certificate and private key; ``pipeline.cluster`` turns them into a
    ``distributed.Security`` and checks that the files exist.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


#: The least memory a worker process is given: one holds ~300 MiB before its first task (Python, NumPy, SciPy,
#: numba, Dask, pyarrow, measured as its RSS); below this it is restarted by its nanny again and again.
MIN_WORKER_MEMORY = 512 * 2**20


def check_memory_limit(v: Any) -> str:
    """``cluster.memory_limit`` as Dask reads it: ``auto``, a byte size (``8GiB``, ``500MB``, a number of bytes) of at
    least ``MIN_WORKER_MEMORY``, or a fraction of the machine's memory (0 < f <= 1); a ``ValueError`` otherwise."""
    text = str(v).strip()
    if text == "auto":
        return text
    try:
        number = float(text)
    except ValueError:
        from dask.utils import parse_bytes

        try:
            number = float(parse_bytes(text))
        except (ValueError, TypeError):
            raise ValueError(f"{text!r} is not a byte size: write auto, a size such as 8GiB or 500MB, or a "
                             "fraction of the machine's memory such as 0.5") from None
    if 0 < number <= 1:
        return text
    if number < MIN_WORKER_MEMORY:
        raise ValueError(f"{text} is less than a worker needs to start (~300 MiB before any work): give at least "
                         f"512MiB, or auto")
    return text


class ClusterSection(Section):
    """``cluster``: a scheduler address (and its TLS files), or the embedded local cluster's size."""

    address: str | None = None
    tls: TlsSection | None = None
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    processes: bool = True
    memory_limit: str = "auto"
    dashboard_address: str | None = "127.0.0.1:0"
    small_data_here: bool = True

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _memory_limit(cls, v: Any) -> str:
        return check_memory_limit(v)


class IngestSection(Section):
    """``ingest``: time window, invalid rows, minimum support, block and piece sizes."""

    as_of: dt.datetime | None = Field(None, **_LAX)
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
    start_date: dt.date = Field(dt.date(2024, 1, 1), **_LAX)
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


def krylov_block_size(rank: int) -> int:
    """``svd.block_size: auto``: 16 columns per block up to rank 256 (fastest at k = 64: ``conf/default.yaml``),
    then rank / 16, so that the rank fits in 16 blocks and a Krylov step's products stay few (63 at k = 1,000)."""
    return max(16, -(-int(rank) // 16))


def krylov_max_blocks(rank: int, block_size: int) -> int:
    """``svd.max_blocks: auto``: room for 4 k columns and one block (40 blocks of 16 up to k = 144): at k = 256 the
    former 40 x 16 = 640 columns stopped unconverged on lastfm-hetrec2011 and a sparser set."""
    return max(40, -(-4 * int(rank) // int(block_size)) + 1)


class SvdSection(Section):
    """``svd``: rank k, solver and the randomized range finder's parameters."""

    rank: Any = 64  # k, or auto: the best of rank_grid on the held-out split (``fit_rank``)
    _auto_sizes: bool = PrivateAttr(False)  # block_size or max_blocks given as auto
    rank_max: int = Field(256, ge=1)  # rank: auto: the train split's one SVD, whose first k columns serve every k
    rank_grid: list[int] | None = None  # rank: auto: the ranks tried; None: ``ranks()``'s default
    rank_within_se: float = Field(1.0, ge=0)  # rank: auto: ranks this many standard errors from the best are tied
    rank_extend: int = Field(1, ge=0)  # rank: auto: SVDs at twice the largest rank while the best score is there
    solver: Literal["krylov", "subspace", "sklearn"] = "krylov"
    block_size: Any = "auto"  # krylov: columns per Krylov block (``auto``: ``krylov_block_size``)
    tol: float = Field(1e-6, gt=0)  # krylov: stop when the estimated relative error of the top-k Ritz values is below
    max_blocks: Any = "auto"  # krylov: at most this many blocks (``auto``: ``krylov_max_blocks``)
    accept_unconverged: bool = False  # krylov: publish a run whose SVD did not reach svd.tol (else the run fails)
    warm_start: str | None = None  # krylov: "previous" (LATEST of run.output) or a run's path: start from its V_k
    oversample: int = Field(10, ge=0)  # subspace, sklearn
    power_iterations: int = Field(32, ge=0)  # subspace, sklearn
    seed: int = 0

    @field_validator("rank", "block_size", "max_blocks", mode="before")
    @classmethod
    def _auto_or_positive(cls, v: Any, info) -> int | str:
        if v == "auto" and isinstance(v, str):
            return v
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"svd.{info.field_name} must be auto or an integer >= 1, got {v!r}")
        return v

    @field_validator("rank_grid")
    @classmethod
    def _rank_grid(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(isinstance(k, bool) or k < 1 for k in v)):
            raise ValueError(f"svd.rank_grid must be a non-empty list of ranks >= 1, got {v}")
        return None if v is None else sorted(set(v))

    def at_rank(self, k: int) -> "SvdSection":
        """A copy at ``rank: k`` whose Krylov sizes are those of rank k where they were ``auto``, as given otherwise
        (``rank: auto``'s published fit at the chosen rank, and the train split's SVD past ``rank_max``)."""
        out = self.model_copy(deep=True)
        if self._auto_sizes:
            out.block_size = krylov_block_size(k)
            out.max_blocks = krylov_max_blocks(k, out.block_size)
        out.rank = int(k)
        return out

    @property
    def fit_rank(self) -> int:
        """The rank the SVD computes: ``rank``, or ``rank_max`` for ``rank: auto`` (its first k columns are the
        rank-k truncation for every k of ``ranks()``)."""
        return self.rank_max if self.rank == "auto" else int(self.rank)

    def ranks(self) -> list[int]:
        """``rank: auto``'s ranks, ascending: ``rank_grid``, or rank_max / 16, / 8, / 4, / 2 and rank_max (those >= 8;
        16, 32, 64, 128, 256 by default)."""
        if self.rank_grid is not None:
            return list(self.rank_grid)
        return sorted({k for k in (self.rank_max >> j for j in (4, 3, 2, 1)) if k >= 8} | {self.rank_max})

    @model_validator(mode="after")
    def _krylov_space_holds_the_rank(self) -> "SvdSection":
        """``auto`` sizes resolved from the rank; then Krylov's space of ``max_blocks x block_size`` columns must hold
        the rank and one block more (its error estimate), or the top-k would come out truncated (zero singular
        values, zero embedding columns)."""
        if self.rank == "auto" and any(k > self.rank_max for k in self.ranks()):
            raise ValueError(f"svd.rank_grid {self.ranks()} goes above svd.rank_max={self.rank_max}: rank: auto reads "
                             "every rank off one SVD of rank svd.rank_max; raise it or drop those ranks")
        if self.block_size == "auto":
            self._auto_sizes = True  # kept through later assignments (``at_rank``)
            self.block_size = krylov_block_size(self.fit_rank)
        if self.max_blocks == "auto":
            self._auto_sizes = True
            self.max_blocks = krylov_max_blocks(self.fit_rank, self.block_size)
        space = self.max_blocks * self.block_size
        if self.solver == "krylov" and self.fit_rank + self.block_size > space:
            need = -(-(self.fit_rank + self.block_size) // self.block_size)
            what = f"svd.rank={self.rank}" if self.rank != "auto" else f"svd.rank_max={self.rank_max}"
            raise ValueError(f"{what} does not fit the Krylov space of svd.max_blocks x svd.block_size "
                             f"= {self.max_blocks} x {self.block_size} = {space} columns (the rank and one block "
                             f"more); raise svd.max_blocks to at least {need}, or lower svd.rank")
        return self


def _check_lambda(v: Any) -> float | str:
    """``auto`` or a finite number >= 0 (as a float); one error naming both otherwise."""
    if v == "auto" and isinstance(v, str):
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < float("inf")):
        raise ValueError("lambda must be auto or a finite number >= 0")
    return float(v)


class CustomScaling(Section):
    """``objectives.eq1.custom``: the exponents (alpha, beta) of the ``custom`` Eq. 1 scaling."""

    alpha: float = 0.5
    beta: float = 0.0


def _check_grid(v: Any, key: str) -> Any:
    """A lambda grid: a number of points >= 2, or a non-empty list of finite lambdas >= 0 (sorted, distinct)."""
    if v is None:
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 2:
            raise ValueError(f"{key} must be a number of points >= 2 or a list of lambdas, got {v}")
        return v
    if not isinstance(v, list) or not v or any(not (x >= 0 and x < float("inf")) for x in v):
        raise ValueError(f"{key} must be a number of points >= 2 or a non-empty list of finite lambdas >= 0, got {v}")
    return sorted(set(float(x) for x in v))


class Eq1Section(Section):
    """``objectives.eq1``: lambda of Eq. 1, its own lambda grid, and the scalings (choices of D) to produce."""

    lambda_: Any = Field("auto", alias="lambda")  # float or "auto" (``_check_lambda``)
    lambda_grid: int | list[float] | None = None  # None: ``objectives.lambda_grid``
    scalings: list[str] = ["symmetric", "item_orthonormal", "user_orthonormal", "eq2_like"]
    custom: CustomScaling = CustomScaling()

    _lambda = field_validator("lambda_")(classmethod(lambda cls, v: _check_lambda(v)))
    _grid = field_validator("lambda_grid", mode="before")(
        classmethod(lambda cls, v: _check_grid(v, "objectives.eq1.lambda_grid")))

    @field_validator("scalings")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        if len(registry.check_names(v, registry.EQ1_SCALINGS, "eq1 scaling")) != len(v):
            raise ValueError(f"objectives.eq1.scalings lists a name twice: {v}")
        return v


class Eq2Section(Section):
    """``objectives.eq2``: lambda of Eq. 2 and its own lambda grid."""

    lambda_: Any = Field("auto", alias="lambda")  # float or "auto" (``_check_lambda``)
    lambda_grid: int | list[float] | None = None  # None: ``objectives.lambda_grid``

    _lambda = field_validator("lambda_")(classmethod(lambda cls, v: _check_lambda(v)))
    _grid = field_validator("lambda_grid", mode="before")(
        classmethod(lambda cls, v: _check_grid(v, "objectives.eq2.lambda_grid")))


class CosineSection(Section):
    """``objectives.cosine``: the model trained with cosine similarity (``pipeline.model.cosine_model``)."""

    lambda_: float = Field(1.0, alias="lambda", ge=0)
    max_iterations: int = Field(1200, ge=0)
    tol: float = Field(3e-3, gt=0)
    max_nnz: int | None = Field(2_000_000, ge=0)


class ObjectivesSection(Section):
    """``objectives``: which of Eq. 1, Eq. 2 and the cosine-trained model to fit (null skips one), and the
    lambda grid of ``lambda: auto``."""

    eq1: Eq1Section | None = Eq1Section()
    eq2: Eq2Section | None = Eq2Section()
    cosine: CosineSection | None = CosineSection()
    lambda_grid: int | list[float] = 13
    lambda_grid_extend: int = Field(6, ge=0)

    _grid = field_validator("lambda_grid", mode="before")(
        classmethod(lambda cls, v: _check_grid(v, "objectives.lambda_grid")))

    def grid_of(self, objective: str) -> int | list[float]:
        """The lambda grid of ``objective`` (``eq1``, ``eq2``): its own ``lambda_grid``, else the common one."""
        own = getattr(self, objective).lambda_grid
        return self.lambda_grid if own is None else own

    def auto(self) -> list[str]:
        """The objectives whose lambda is ``auto``."""
        return [name for name in ("eq1", "eq2")
                if getattr(self, name) is not None and getattr(self, name).lambda_ == "auto"]


class NeighboursSection(Section):
    """``neighbours``: list length, the metrics of each list kind, users, task and tile sizes."""

    top_n: int = Field(100, ge=1)
    item_item: list[str] = list(registry.metrics_of("item_item"))
    user_item: list[str] = list(registry.metrics_of("user_item"))
    user_user: list[str] = []  # user-user lists cost n^2 k flops and n x N rows: off unless asked for
    # Eq. 1 scalings whose scaling-dependent lists (item-item cosine and dot, user-item and user-user cosine) are
    # published: [] (none, the default: they are arbitrary, Steck et al. Section 2), names among
    # objectives.eq1.scalings, or "all"; the scaling-invariant lists are published once whatever this says
    eq1_scalings: list[str] | Literal["all"] = []
    users: list[Any] | None = None
    query_chunk: int = Field(2048, ge=1)
    candidate_block: int = Field(1280, ge=1)
    # rows below this times the largest row norm of their embedding get no cosine lists and are no cosine
    # neighbour (their direction is float32 noise); measured in conf/default.yaml's comment
    cosine_norm_floor: float = Field(1.0e-4, ge=0, lt=1)

    @field_validator("item_item", "user_item", "user_user")
    @classmethod
    def _metrics(cls, v: list[str], info) -> list[str]:
        return registry.check_names(v, registry.metrics_of(info.field_name), "metric")

    @field_validator("eq1_scalings")
    @classmethod
    def _scalings(cls, v: list[str] | str) -> list[str] | str:
        if v == "all":
            return v
        if len(registry.check_names(v, registry.EQ1_SCALINGS, "eq1 scaling")) != len(v):
            raise ValueError(f"neighbours.eq1_scalings lists a name twice: {v}")
        return v

    def scaling_lists(self, produced: list[str]) -> list[str]:
        """The Eq. 1 scalings, among the ``produced`` ones, whose scaling-dependent lists are published."""
        return list(produced) if self.eq1_scalings == "all" else list(self.eq1_scalings)


class EvaluationSection(Section):
    """``evaluation``: the held-out split, cutoffs and the item truth for cluster precision."""

    holdout: Literal["none", "random", "temporal"] = "random"
    fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    max_users: int = Field(50_000, ge=1)  # held-out metrics over a seeded sample of at most this many users
    cutoffs: list[int] = [10, 20, 100]
    item_truth: str | None = None
    truth_cluster_col: str = "cluster"
    truth_popularity_col: str | None = "popularity"
    select_metric: str = "ndcg@20"  # recall@N or ndcg@N: the held-out metric that picks lambda: auto

    @field_validator("select_metric")
    @classmethod
    def _select(cls, v: str) -> str:
        name, _, cut = v.partition("@")
        if name not in ("recall", "ndcg") or not cut.isdigit() or int(cut) < 1:
            raise ValueError(f"evaluation.select_metric must be recall@N or ndcg@N (N >= 1), e.g. ndcg@20; got {v!r}")
        return v

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
    max_items: int = Field(20_000, ge=1)  # query items: a seeded sample of at most this many (candidates: all)
    least_stable: int = Field(20, ge=0)


class ReportSection(Section):
    """``report``: whether to draw the run report, how many items its heatmaps show, and its samples."""

    enabled: bool = True
    heatmap_items: int = Field(1000, ge=2)
    pairs: int = Field(5000, ge=1)  # item pairs of the cosine / model score scatter
    rank_items: int = Field(500, ge=1)  # query items of the rank displacement under a random rescaling
    seed: int = Field(0, ge=0)  # seed of both samples and of the heatmaps' k-means


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

    @model_validator(mode="after")
    def _auto_needs_holdout(self) -> "Config":
        auto = [f"objectives.{name}.lambda" for name in self.objectives.auto()]
        auto += ["svd.rank"] if self.svd.rank == "auto" else []
        if auto and self.evaluation.holdout == "none":
            keys = " and ".join(auto)
            raise ValueError(f"{keys}: auto picks lambda and the rank on held-out data, but evaluation.holdout is "
                             "none; set evaluation.holdout to random or temporal, or set them to numbers")
        if self.svd.rank == "auto" and self.objectives.eq1 is None and self.objectives.eq2 is None:
            raise ValueError("svd.rank: auto scores the ranks with Eq. 1 or Eq. 2's lists; both are null: set svd.rank "
                             "to a number")
        return self

    @model_validator(mode="after")
    def _listed_scalings_are_produced(self) -> "Config":
        eq1 = self.objectives.eq1
        wanted = self.neighbours.eq1_scalings
        missing = [] if wanted == "all" else [s for s in wanted if eq1 is None or s not in eq1.scalings]
        if missing:
            produced = ", ".join(eq1.scalings) if eq1 is not None else "none: objectives.eq1 is null"
            raise ValueError(f"neighbours.eq1_scalings names {', '.join(missing)}, which objectives.eq1.scalings does "
                             f"not produce ({produced}); add it there or remove it here")
        return self

    def list_scalings(self) -> list[str]:
        """The Eq. 1 scalings whose scaling-dependent lists are published (``neighbours.eq1_scalings``)."""
        return self.neighbours.scaling_lists(self.objectives.eq1.scalings if self.objectives.eq1 is not None else [])

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


@dataclass(frozen=True)
class ConfigSource:
    """Where a config's values came from: a YAML file (or a mapping) and the ``--set`` overrides on top.

    ``of(loc)`` names the source of the key at ``loc`` for an error message: the last override that
    set it (or a section above it), else the file; a section that only overrides created is named
    by those overrides.
    """

    name: str
    overrides: tuple[str, ...] = ()
    file_keys: frozenset[tuple[str, ...]] = frozenset()  # every key path present in the file
    label: str = "--set"  # how an override is named: ``--set svd.rank=3``, or ``run_pipeline override ...``

    def of(self, loc: tuple) -> str:
        """The source of the key at ``loc`` (pydantic's error location)."""
        loc = tuple(str(p) for p in loc)
        for text in reversed(self.overrides):
            key = override_key(text)
            if loc[: len(key)] == key:
                return f"{self.label} {text}"
        inner = [f"{self.label} {t}" for t in self.overrides if override_key(t)[: len(loc)] == loc]
        if not inner:
            return self.name
        if loc in self.file_keys:
            return f"{self.name} and {', '.join(inner)}"
        return ", ".join(inner)


def _key_paths(node: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every key path of a nested mapping (``{"svd": {"rank": 3}}`` -> ``("svd",), ("svd", "rank")``)."""
    out: set[tuple[str, ...]] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            out.add(prefix + (str(k),))
            out |= _key_paths(v, prefix + (str(k),))
    return out


def format_validation_error(err: ValidationError, source: str | ConfigSource) -> str:
    """One line per pydantic error, naming the dotted key, its source (file or ``--set``) and the valid keys."""
    if isinstance(source, str):
        source = ConfigSource(source)
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        where = source.of(loc)
        if e["type"] == "extra_forbidden":
            owner = _model_at(Config, loc)
            valid = ", ".join(_field_names(owner)) if owner else "see conf/default.yaml"
            lines.append(f"unknown config key '{key}' in {where}; valid keys here: {valid}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")  # a whole section (a check across its keys) is not repeated in the message
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            if not loc:  # a check across sections: its message names the keys
                lines.append(f"invalid config: {msg}")
            else:
                lines.append(f"invalid config key '{key}' in {where}: {msg}{shown}")
    return "; ".join(lines)


# ---------------------------------------------------------------------------------------------
# YAML


class YamlProblem(yaml.YAMLError):
    """A document the config loader refuses: a key given twice, or a tag it does not build."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


_YAML_TAG_PREFIX = "tag:yaml.org,2002:"


def _tag_name(tag: str) -> str:
    return "!!" + tag.removeprefix(_YAML_TAG_PREFIX) if tag.startswith(_YAML_TAG_PREFIX) else tag


def _check_unique_keys(node: yaml.Node, path: tuple[str, ...], seen: set[int]) -> None:
    """Raise ``YamlProblem`` for the first key given twice in one mapping under ``node`` (depth first)."""
    if id(node) in seen:  # an alias to a node already checked (aliases may even form cycles)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], yaml.Mark] = {}
        for key_node, value_node in node.value:
            name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _YAML_TAG_PREFIX + "merge":
                ident = (key_node.tag, key_node.value)
                if ident in first:
                    a, b = first[ident], key_node.start_mark
                    where = (f"line {a.line + 1} and line {b.line + 1}" if a.line != b.line
                             else f"line {a.line + 1}, columns {a.column + 1} and {b.column + 1}")
                    raise YamlProblem(f"key '{'.'.join(path + (name,))}' is given twice ({where}); keep one of them")
                first[ident] = key_node.start_mark
            _check_unique_keys(value_node, path + (name,), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, path + (str(i),), seen)


#: A config holds a few hundred values; a document that expands to more through its aliases (``&a`` / ``*a``, the
#: "billion laughs") or nests deeper is refused before it is built: 661 bytes of aliases expanded to 2.65 GB.
MAX_EXPANDED_VALUES = 100_000
MAX_DEPTH = 64


def _check_expanded_size(root: yaml.Node) -> None:
    """Raise ``YamlProblem`` when the document, each alias expanded, holds more than ``MAX_EXPANDED_VALUES`` values,
    nests deeper than ``MAX_DEPTH``, or refers to itself; O(distinct nodes) with the expanded sizes memoized."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise YamlProblem(f"line {node.start_mark.line + 1}: an alias refers to the mapping or list that holds "
                              "it (a cycle); a config cannot be infinite: remove the alias")
        if depth > MAX_DEPTH:
            raise YamlProblem(f"line {node.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep; a config "
                              "has sections of keys: flatten it")
        open_nodes.add(key)
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(item, depth + 1) for item in node.value)
        else:
            total = 1
        open_nodes.discard(key)
        if total > MAX_EXPANDED_VALUES:
            raise YamlProblem(f"the document expands to more than {MAX_EXPANDED_VALUES:,} values through its aliases "
                              "(&anchor / *alias); a config holds a few hundred: write the values out, without "
                              "aliases")
        sizes[key] = total
        return total

    size(root, 0)


class ConfigLoader(yaml.SafeLoader):
    """The YAML loader of configs: ``yaml.SafeLoader`` that also rejects a key given twice.

    Safe: only plain values are built (mappings, lists, strings, numbers, booleans, null, dates);
    any other tag (``!!python/object/apply:os.system``) is refused with its line. A key given
    twice in one mapping is an error naming the dotted key and both lines, where PyYAML would keep
    the last silently. Numbers with an exponent and no dot (``1e-3``) are floats, as in YAML 1.2
    (PyYAML's YAML 1.1 reads them as strings, which strict float keys would refuse).
    """

    def construct_document(self, node):
        """Check the whole document (its size with aliases expanded, then duplicate keys), then build it."""
        _check_expanded_size(node)
        _check_unique_keys(node, (), set())
        return super().construct_document(node)

    def construct_undefined(self, node):
        """Refuse a tag the safe loader does not build, naming the tag and its line."""
        raise YamlProblem(f"line {node.start_mark.line + 1}: the tag '{_tag_name(node.tag)}' is not allowed; configs "
                          "are read with a safe YAML loader that builds plain values only (mappings, lists, "
                          "strings, numbers, booleans, null, dates): remove the tag")


ConfigLoader.add_constructor(None, ConfigLoader.construct_undefined)
ConfigLoader.add_implicit_resolver(
    _YAML_TAG_PREFIX + "float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml_error_line(exc: yaml.YAMLError) -> str:
    """A PyYAML error on one line: ``line L, column C: problem (context)``."""
    if isinstance(exc, YamlProblem):
        return exc.message
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem is None:  # a ReaderError and other errors without a problem mark
        return " ".join(str(exc).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(exc, "context", None)
    return where + problem + (f" ({context})" if context else "")


def load_yaml(text: str) -> Any:
    """The value of a YAML document, read with ``ConfigLoader`` (safe, no duplicate keys).

    Raises ``yaml.YAMLError`` (``YamlProblem`` for a duplicate key or a refused tag).
    """
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506  (ConfigLoader is a SafeLoader)


# ---------------------------------------------------------------------------------------------
# loading


def override_key(text: str) -> tuple[str, ...]:
    """The dotted key of a ``--set key=value`` override, split: ``svd.rank=3`` -> ``("svd", "rank")``."""
    return tuple(part.strip() for part in text.split("=", 1)[0].strip().split("."))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in text:
        raise MfsimError(f"--set expects dotted.key=value, got {text!r} (example: --set svd.rank=32)")
    raw = text.split("=", 1)[1]
    path = override_key(text)
    key = ".".join(path)
    if not key or any(not part for part in path):
        raise MfsimError(f"--set has an empty key in {text!r} (example: --set svd.rank=32)")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except YamlProblem as exc:
        raise MfsimError(f"--set {key}: value {raw!r}: {exc.message}") from None
    except yaml.YAMLError as exc:
        raise MfsimError(f"--set {key}: value {raw!r} is not valid YAML ({_yaml_error_line(exc)})") from None
    return list(path), value


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
    """The YAML mapping of a config file; every error is one ``MfsimError`` naming the file."""
    p = Path(path)
    if p.is_dir():
        raise MfsimError(f"config file {p} is a directory; pass a YAML file such as conf/default.yaml")
    if not p.exists():
        shipped = Path(__file__).resolve().parents[1] / "conf"
        raise MfsimError(f"config file {p} does not exist (relative paths are read from {Path.cwd()}); pass a YAML "
                         f"file: the configs mfsim ships are {shipped / 'default.yaml'} and {shipped / 'paper.yaml'}")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise MfsimError(f"config file {p} cannot be read ({exc.strerror or exc}); check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise MfsimError(f"config file {p} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); "
                         "save it as UTF-8") from None
    try:
        data = load_yaml(text) or {}
    except YamlProblem as exc:
        raise MfsimError(f"config file {p}: {exc.message}") from None
    except yaml.YAMLError as exc:
        raise MfsimError(f"config file {p} is not valid YAML: {_yaml_error_line(exc)}") from None
    if not isinstance(data, dict):
        raise MfsimError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | Mapping[str, Any] | None = None, overrides: list[str] | None = None, *,
                label: str = "--set") -> Config:
    """Load ``path`` (default: conf/default.yaml), apply ``--set`` overrides, validate.

    ``path`` may also be a mapping of sections, read as a YAML file's mapping would be (keys it
    leaves out keep their defaults). An error names the file (or mapping), or the override, that
    gave the bad key; ``label`` is how an override is named there (``--set``).
    """
    if isinstance(path, Mapping):
        name, data = "the config mapping", copy.deepcopy(dict(path))
    else:
        name = str(path) if path is not None else str(DEFAULT_CONFIG)
        data = read_yaml(name)
    overrides = list(overrides or [])
    source = ConfigSource(name, tuple(overrides), frozenset(_key_paths(data)), label)
    data = apply_overrides(data, overrides)
    return validate_config(data, source)


def validate_config(data: dict, source: str | ConfigSource = "config") -> Config:
    """A ``Config`` from a raw mapping; one ``MfsimError`` naming every bad key and its source."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise MfsimError(format_validation_error(err, source)) from None
