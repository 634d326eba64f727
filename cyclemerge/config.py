"""The one configuration schema of cyclemerge, mirrored key for key by ``params.yaml``.

Every section belongs to one pipeline stage so that DVC can declare exactly which params a
stage depends on. Unknown keys, wrong types and impossible values fail on load, before any
work starts, with a message naming the file, the key and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Each list of choices is written once, as a Literal type; the tuples code iterates over come from it.
Dataset = Literal["fashion_mnist", "mnist", "emnist", "cifar10", "cifar100", "synthetic"]
Architecture = Literal["mlp", "resnet20", "vgg16", "custom"]
Matcher = Literal["c2m3", "merge_many", "pairwise", "naive"]
Baseline = Literal[Matcher, "ensemble"]
RepairMethod = Literal["repair", "reset_bn", "none"]
OutlierAction = Literal["drop", "gate_off"]
Granularity = Literal["model", "layer", "tensor", "channel"]
Device = Literal["auto", "cpu", "cuda"]

DATASETS: tuple[str, ...] = get_args(Dataset)
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
MATCHERS: tuple[str, ...] = get_args(Matcher)
BASELINES: tuple[str, ...] = get_args(Baseline)
REPAIR_METHODS: tuple[str, ...] = get_args(RepairMethod)
OUTLIER_ACTIONS: tuple[str, ...] = get_args(OutlierAction)
GRANULARITIES: tuple[str, ...] = get_args(Granularity)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(Section):
    """Deterministic generated data: class-dependent Gaussian blobs in image shape."""

    num_train: int = Field(2000, ge=10)
    num_test: int = Field(500, ge=10)
    num_classes: int = Field(10, ge=2)
    channels: int = Field(1, ge=1)
    image_size: int = Field(28, ge=4)
    noise: float = Field(1.0, gt=0)


class DataConfig(Section):
    name: Dataset = "fashion_mnist"
    root: str = "data"
    download: bool = True
    emnist_split: Literal["letters", "balanced", "digits", "mnist", "byclass", "bymerge"] = "letters"
    calibration_size: int = Field(5000, ge=1)
    calibration_disjoint: bool = True
    # held-out slice of the TRAIN split for every selection by data (restarts, recipe, defaults); 0: none;
    # disjoint from the models' training data and from the calibration slice
    validation_size: int = Field(5000, ge=0)
    train_subset: int | None = Field(None, ge=1)
    test_subset: int | None = Field(None, ge=1)
    seed: int = 0
    synthetic: SyntheticConfig = SyntheticConfig()


# "package.module:function" (the function may be an attribute path such as "Class.create").
_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_CUSTOM_ONLY = ("factory", "kwargs", "opaque_modules")


class ModelConfig(Section):
    arch: Architecture = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [512, 512, 512, 256], min_length=1)
    width: int = Field(1, ge=1)
    norm: Literal["layernorm", "batchnorm"] = "layernorm"
    # arch custom: the factory is imported and called with kwargs (models are never unpickled)
    factory: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    opaque_modules: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _positive_widths(self) -> "ModelConfig":
        bad = [h for h in self.hidden if h < 1]
        if bad:
            raise ValueError(f"model.hidden: every width must be >= 1, got {self.hidden}")
        return self

    @model_validator(mode="after")
    def _custom_factory(self) -> "ModelConfig":
        if self.arch != "custom":
            given = [k for k in _CUSTOM_ONLY if getattr(self, k)]
            if given:
                raise ValueError(f"model.{given[0]} applies only to model.arch: custom (model.arch is {self.arch!r}); "
                                 f"remove it or set model.arch: custom")
            return self
        if self.factory is None:
            raise ValueError('model.factory: model.arch custom needs a factory, "package.module:function" '
                             '(e.g. "tests.fixtures.user_cnn:build"), importable from the project folder')
        if not _FACTORY.fullmatch(self.factory):
            raise ValueError(f'model.factory: {self.factory!r} is not "package.module:function" '
                             '(dotted module path, one colon, then the function, e.g. "tests.fixtures.user_cnn:build")')
        bad = [k for k in self.kwargs if not str(k).isidentifier()]
        if bad:
            raise ValueError(f"model.kwargs: {bad} are not valid keyword argument names")
        return self


class TrainConfig(Section):
    num_models: int = Field(5, ge=2)
    seeds: list[int] | None = None
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(256, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "constant", "warmup_cosine"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)
    grad_clip: float | None = Field(10.0, gt=0)
    augment: bool = False
    # bf16 autocast (and channels-last images) roughly doubles conv training on CPUs with AVX512-BF16 or AMX
    # and on recent GPUs; weights, optimizer state and every later stage stay fp32.
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Device = "auto"
    checkpoints: list[str] | None = None

    @model_validator(mode="after")
    def _seeds_match(self) -> "TrainConfig":
        if self.seeds is not None and len(self.seeds) != self.num_models:
            raise ValueError(
                f"train.seeds has {len(self.seeds)} entries but train.num_models is {self.num_models}; "
                "give one seed per model or set train.seeds: null (seeds 1..num_models)"
            )
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"train.seeds must be distinct, got {self.seeds}")
        if self.checkpoints is not None and len(self.checkpoints) < 2:
            raise ValueError("train.checkpoints: merging needs at least 2 checkpoints")
        return self

    def model_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else list(range(1, self.num_models + 1))


class ActivationsConfig(Section):
    num_samples: int = Field(5000, ge=1)
    batch_size: int = Field(500, ge=1)
    correlations: bool = False


class AlignConfig(Section):
    method: Matcher = "c2m3"
    cost: Literal["weights", "activations"] = "weights"
    init: Literal["identity", "barycenter", "sinkhorn"] = "barycenter"
    max_iter: int = Field(200, ge=1)
    patience: int = Field(5, ge=1)
    tol: float = Field(1e-6, ge=0)
    restarts: int = Field(1, ge=1)
    select_by: Literal["objective", "calibration_loss"] = "objective"
    reference: int = Field(0, ge=0)
    anchor: bool = True  # C2M3: hold model `reference` at the identity (false: the paper's symmetric FW)
    # C2M3: after rounding, block-coordinate ascent over (model, group) LAPs, each kept only when the
    # objective rises; on since the selection grid chose it on validation (benchmarks/results/selection.md)
    polish: bool = True
    seed: int = 0
    device: Device = "auto"
    outlier_norm_ratio: float | None = Field(100.0, gt=1)
    outlier_action: OutlierAction = "drop"


class GatesConfig(Section):
    enabled: bool = True
    granularity: Granularity = "layer"
    gated_parts: list[str] = Field(default_factory=lambda: ["*"])
    ungated_rule: str = "average"
    normalize: bool = True
    all_off_fallback: Literal["uniform", "argmax"] = "uniform"
    beta: float = Field(2.0 / 3.0, gt=0)
    beta_final: float | None = Field(None, gt=0)
    gamma: float = Field(-0.1, lt=0)
    zeta: float = Field(1.1, gt=1)
    log_alpha_init: float = 0.0
    log_alpha_clamp: float = Field(8.0, gt=0)
    init_off: float = Field(8.0, gt=0)
    lam: float = Field(0.1, ge=0)  # chosen on validation: benchmarks/results/selection.md
    penalty_weighting: Literal["count", "params"] = "count"
    # Adam moves log_alpha by about lr per step: 300 steps at 0.05 can carry a gate from 0 past the
    # closing point (-ln 11 = -2.4) and the clamp; at 0.01 a gate could barely close at all.
    lr: float = Field(5e-2, gt=0)
    steps: int = Field(300, ge=1)
    batch_size: int = Field(256, ge=1)
    mc_samples: int = Field(1, ge=1)
    grad_clip: float | None = Field(10.0, gt=0)
    final_gates: Literal["deterministic", "threshold", "argmax"] = "deterministic"
    seed: int = 0

    @model_validator(mode="after")
    def _ungated_rule(self) -> "GatesConfig":
        rule = self.ungated_rule
        if rule != "average" and not (rule.startswith("model:") and rule[6:].isdigit()):
            raise ValueError(f"gates.ungated_rule must be 'average' or 'model:<k>', got {rule!r}")
        return self


class RepairConfig(Section):
    method: RepairMethod = "repair"
    num_samples: int = Field(5000, ge=1)
    # REPAIR corrects every stat point in one pass with each batch's own statistics: a batch holding
    # the whole slice meets the goal statistics exactly; smaller batches (for large models) leave an
    # error of order 1/sqrt(batch_size * num_samples).
    batch_size: int = Field(5000, ge=1)


class EvaluateConfig(Section):
    baselines: list[Baseline] = Field(
        default_factory=lambda: ["naive", "merge_many", "pairwise", "ensemble"]
    )
    batch_size: int = Field(1000, ge=1)
    train_subset: int | None = Field(10000, ge=1)
    interpolation_steps: int = Field(11, ge=2)
    cycle: bool = True


class TrackingConfig(Section):
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "cyclemerge"
    on_error: Literal["warn", "fail"] = "warn"
    register_model: bool = True
    model_name: str = "cyclemerge-merged"


class OrchestrationConfig(Section):
    task_runner: Literal["threads", "sequential", "dask"] = "threads"
    max_workers: int = Field(2, ge=1)
    dask_address: str | None = None
    dask_workers: int = Field(2, ge=1)
    cache: bool = True


class Config(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    activations: ActivationsConfig = ActivationsConfig()
    align: AlignConfig = AlignConfig()
    gates: GatesConfig = GatesConfig()
    repair: RepairConfig = RepairConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    def section_hash(self, *names: str) -> str:
        """Hash of the named sections (all when none are named): the params part of a cache key."""
        dumped = self.model_dump(mode="json")
        picked = {n: dumped[n] for n in (names or dumped.keys())}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A params file that cannot be used; the message says which key and what is allowed."""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = e["loc"][:-1]
            allowed = _allowed_keys(parent)
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}"
        lines.append(f"  {key}: {msg} (got {e.get('input')!r})" if e["type"] != "extra_forbidden" else f"  {key}: {msg}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    return list(model.model_fields)


def set_override(raw: dict, dotted: str, value: Any) -> None:
    """Apply ``key.sub=value`` to a raw params dict (the same syntax as ``dvc exp run -S``)."""
    node = raw
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[leaf] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. gates.lam=0.1")
        key, text = item.split("=", 1)
        try:
            out.append((key.strip(), yaml.safe_load(text)))
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                              "quote a string value, e.g. key='[text'") from None
    return out


def load_config(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found (copy params.yaml from the repository root)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); a params file is YAML text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e}); give the path of a params file") from None
    raw = {} if raw is None else raw  # an empty file means all defaults; `0` or `[]` do not
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for key, value in parse_overrides(overrides or []):
        set_override(raw, key, value)
    source = f"{path} with --set {' '.join(overrides)}" if overrides else str(path)
    return config_from_dict(raw, source=source)


def config_from_dict(raw: dict, source: str = "params") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def dump_params(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
