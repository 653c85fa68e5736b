"""The experiment config: a pydantic schema with defaults, YAML loading and KEY=VALUE overrides."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

from .errors import UserError

__all__ = [
    "Config",
    "Strict",
    "DataConfig",
    "InitConfig",
    "LauncherConfig",
    "ModelOptions",
    "apply_overrides",
    "dump_config",
    "format_validation_error",
    "load_config",
    "parse_config",
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(Strict):
    source: str = "synthetic"  # synthetic | csv | npy | a built-in data set name
    # synthetic sizes: within these bounds numpy's arrays (N × D × D at most) stay representable,
    # so an oversized draw runs out of memory (a clear error) instead of overflowing an index
    n: int = Field(2000, ge=2, le=10**10)  # synthetic: number of points (train + test)
    dim: int = Field(2, ge=1, le=10**4)
    k: int = Field(3, ge=1, le=10**4)  # synthetic: true number of components
    separation: float = Field(4.0, gt=0, le=1e6)  # synthetic: minimal distance between true means
    # synthetic data of a sequence model (hidden Markov): rows per simulated sequence, the last
    # one shorter where data.n is not a multiple (null: the n rows are one sequence)
    sequence_length: int | None = Field(None, ge=1)
    path: str | None = None  # csv / npy: the file; npy: or a directory of .npy shards, in name order
    label_column: str | None = None  # csv: true labels, kept out of the features
    # sequences (e.g. for hidden Markov models); null: the rows are independent points
    sequence_column: str | None = None  # csv: rows with the same value form one sequence, in file order
    lengths_path: str | None = None  # npy: one integer length per sequence, in row order (.npy or text)
    standardize: bool = False  # z-score with the train split's statistics
    # the seed of the simulation and of the train/test split (null: the experiment's seed); set
    # it to keep the data fixed while a sweep's seeds change the starts
    seed: int | None = Field(None, ge=0, lt=2**63)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)  # 0 = no test split


class ModelOptions(Strict):
    """What every model's ``model:`` block has; each model's own schema adds its fields
    (``LatentModel.options``), and the block is validated by the schema that ``name`` picks."""

    name: str = "gmm"
    k: int = Field(3, ge=1)
    prior: Literal["none", "conjugate"] = "none"  # none: maximum likelihood (a flat prior)


class InitConfig(Strict):
    method: Literal["kmeans", "kmeans++", "random_from_data", "from_run", "given"] = "kmeans++"
    n_init: int = Field(1, ge=1, le=1000)  # restarts; each backend keeps its best by train log-likelihood
    run: str | None = None  # from_run: an experiment or backend directory
    # given: a safetensors file with the model's tensors (e.g. an earlier run's params.safetensors)
    path: str | None = None
    kmeans_iter: int = Field(100, ge=1)  # kmeans: at most this many Lloyd iterations
    # gmm only: added to initial covariance diagonals (null: 1e-6); refused by other models
    reg_covar: float | None = Field(None, ge=0)
    # seeding sees at most this many train rows (a seeded random subset), so that its O(N × K)
    # temporaries stay bounded on huge or memory-mapped data; all rows when N is smaller
    max_rows: int = Field(1_000_000, ge=2)


class LauncherConfig(Strict):
    """Per-job resources of a sweep's Slurm jobs (``ppl-gmm sweep --launcher slurm``); the
    command's flags override them. Ignored by ``run`` and by the local launcher."""

    partition: str | None = None  # null: the cluster's default partition
    time_min: int = Field(60, ge=1)  # a job's time limit in minutes
    cpus: int = Field(1, ge=1, le=4096)  # cores per job, and the torch threads of its run
    mem_gb: float | None = Field(None, gt=0)  # null: the partition's default
    gpus: int = Field(0, ge=0, le=64)
    # points each job runs one after another: more than 1 saves a job's start-up (a Python with
    # torch, seconds) per point when points are small
    points_per_job: int = Field(1, ge=1)


class Config(Strict):
    experiment: str = Field("experiment", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    seed: int = Field(0, ge=0, lt=2**63)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    dtype: Literal["float64", "float32"] = "float64"
    data: DataConfig = DataConfig()
    # validated by the schema of the model that model.name picks (see parse_config)
    model: SerializeAsAny[ModelOptions] = Field(default_factory=lambda: _model_options({}))
    init: InitConfig = InitConfig()
    # each backend listed runs, in this order; its options are validated by the backend; a
    # backend set to null is dropped (`backends.svi=null` on the command line removes svi)
    backends: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"em": dict[str, Any]()})
    # torch threads of every backend's fit and scoring; null: 1 for small problems, torch's
    # default (all cores) for large ones (see experiment.auto_threads)
    threads: int | None = Field(None, ge=1, le=4096)
    launcher: LauncherConfig = LauncherConfig()  # sweeps on Slurm: each job's resources

    @field_validator("backends", mode="before")
    @classmethod
    def _drop_null_backends(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {name: opts for name, opts in value.items() if opts is not None}
        return value

    @field_validator("backends")
    @classmethod
    def _at_least_one(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not value:
            raise ValueError(
                "list at least one backend that is not null (null drops it), e.g. `backends: {em: {}}`"
            )
        return value


def format_validation_error(
    err: ValidationError, model: type[BaseModel], prefix: str = "", owner: str | None = None
) -> str:
    """One line naming the field, what was expected and what was found; ``owner``, the model
    whose schema it is, is named for unknown fields."""
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"]]
    field = ".".join([prefix, *loc] if prefix else loc) or "config"
    if first["type"] == "extra_forbidden":
        known = _known_fields(model, loc[:-1])
        hint = difflib.get_close_matches(loc[-1], known, n=1)
        fix = f" Did you mean {hint[0]!r}?" if hint else ""
        whose = f" for model {owner!r}" if owner and len(loc) == 1 else ""
        return f"{field}: unknown field{whose}. Known fields here: {', '.join(known)}.{fix}"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        return f"{field}: {msg.lower()}."
    return f"{field}: {msg}, but found {first['input']!r}."


def _known_fields(model: type[BaseModel], loc: Sequence[str]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries in a nested dict; values parse as YAML scalars."""
    result = _copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override {item!r}: expected KEY=VALUE, e.g. model.k=5.")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as exc:
            detail = " ".join(str(exc).split())
            raise UserError(f"{key}: the value {text!r} is not valid YAML ({detail}).") from None
        node = result
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise UserError(f"{key}: {where} is {child!r}, not a section with fields.")
            node = child
        node[parts[-1]] = value
    return result


def _copy(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _copy(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_copy(value) for value in node]
    return node


def parse_config(raw: Any, overrides: Sequence[str] = ()) -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"config: expected a mapping of fields, but found {type(raw).__name__}.")
    raw = apply_overrides(raw, overrides)
    model = _model_options(raw.get("model"))
    try:
        return Config.model_validate({**raw, "model": model})
    except ValidationError as err:
        raise UserError(format_validation_error(err, Config)) from None


def _model_options(raw: Any) -> ModelOptions:
    """The ``model:`` block validated by the schema of the model it names: a union keyed on
    ``model.name``, so each model checks its own fields and a field another model owns is an
    error naming it."""
    from .models import MODELS  # the registry imports this module for ModelOptions

    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise UserError(f"model: expected a mapping of fields, but found {raw!r}.")
    name = raw.get("name", ModelOptions.model_fields["name"].default)
    if not isinstance(name, str):
        raise UserError(f"model.name: expected a model name, but found {name!r}.")
    schema = MODELS.get(name, field="model.name").options
    try:
        return schema.model_validate(dict(raw))
    except ValidationError as err:
        raise UserError(format_validation_error(err, schema, "model", owner=name)) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``KEY=VALUE`` overrides and validate it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the config ({exc}).") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        detail = str(exc).replace("\n", " ")
        raise UserError(f"{path}: not valid YAML ({detail}).") from None
    return parse_config(raw, overrides)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
