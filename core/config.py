"""Typed config schemas and strict loading: YAML file + `key=value` overrides.

Each stage declares its schema as a dataclass built from the shared sections below
(`byol.train.Config`, `distill.train.Config`, ...). `load_config` merges defaults, the YAML
file and the overrides with OmegaConf's structured configs, then checks every field that
has a fixed set of choices. Any mistake (unknown key, wrong type, bad choice, missing
file) raises `UserError` with one line that names the key and what is valid.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Type, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from core.augment import AugmentConfig
from core.errors import UserError

T = TypeVar("T")


def choice(default: str, *choices: str):
    """A string field restricted to `choices` (checked by `load_config`)."""
    assert default in choices, (default, choices)
    return field(default=default, metadata={"choices": choices})


# ----------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    name: str = choice("digits", "cifar10", "cifar100", "stl10", "imagefolder", "digits", "synthetic")
    root: str = "data"  # torchvision root, or the folder of class folders for imagefolder
    download: bool = False  # torchvision datasets only; clusters often have no network
    image_size: int = 32  # side of the training views and of the cached images
    val_fraction: float = 0.1  # carved from train by split_seed (CIFAR-10: 45k / 5k)
    split_seed: int = 0
    # imagefolder: True decodes every image once (resized to image_size) into a cached uint8
    # tensor, right for small images; False streams JPEG bytes for ImageNet-sized data.
    in_memory: bool = True
    cache_dir: str = ""  # where decoded uint8 tensors are cached; "" = $XDG_CACHE_HOME/byolc or ~/.cache/byolc
    num_workers: int = 4  # only for the streaming (in_memory=False) path
    synthetic_size: int = 512  # synthetic: number of train+val images
    synthetic_classes: int = 10
    # The split every stage also reports on (test_* metrics; never used for a decision):
    # auto = the official test split where the dataset has one (cifar10/100 and stl10 ship it in
    # the same files; imagefolder: data.test_root), none for digits and synthetic;
    # true = required (digits: a fixed 20% held out before train/val are carved); false = none.
    test: str = choice("auto", "auto", "true", "false")
    test_root: str = ""  # imagefolder: the test split's folder of class folders (e.g. ImageNet's val/)
    # stl10: self-supervised pretraining (byol) on train + the 100k unlabelled images, as the
    # field does; auto = byol only (probes and every labelled stage train on `train`).
    unlabeled: str = choice("auto", "auto", "true", "false")


@dataclass
class ModelConfig:
    arch: str = choice("resnet18", "resnet18", "resnet34", "resnet50")
    cifar_stem: bool = True  # 3x3 stride-1 first conv and no max-pool, for 32px inputs


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = choice("lars", "lars", "sgd", "adamw")
    lr: float = 1.0  # for a batch of 256; scaled linearly with batch_size (Goyal et al. 2017)
    weight_decay: float = 1.5e-6
    momentum: float = 0.9
    nesterov: bool = False  # sgd only
    warmup_epochs: float = 1.0
    checkpoint_every_steps: int = 0  # 0 = only at the end of each epoch (and on SIGTERM/SIGUSR2)
    max_steps: int = 0  # > 0 stops after this many steps (tests, smoke runs); the schedule keeps `epochs`
    # > 0: the stage ends within this many minutes, setup and evaluation included. A few timed
    # steps fix the number of epochs (train.epochs is then ignored); the whole schedule (warmup-
    # cosine lr, BYOL's momentum, QAT's freezes at the same fractions) fits it (core/loop.py).
    budget_min: float = 0.0


@dataclass
class EvalConfig:
    knn_k: int = 200  # Wu et al. 2018, as in solo-learn and lightly's benchmarks
    knn_temperature: float = 0.1
    knn_every_epochs: int = 1  # 0 = only at the end
    probe: bool = True  # linear probe at the end of the stage
    probe_epochs: int = 100
    probe_lr: float = 0.1
    probe_batch_size: int = 512
    probe_weight_decay: float = 0.0
    feature_batch_size: int = 512


@dataclass
class EngineConfig:
    device: str = choice("auto", "auto", "cpu", "cuda")
    precision: str = choice("auto", "auto", "bf16", "fp32")  # auto: bf16 autocast on CUDA, fp32 on CPU
    # auto: torch.compile on CUDA only. (Not on/off: YAML reads those as booleans.)
    compile: str = choice("auto", "auto", "always", "never")
    channels_last: bool = True  # CUDA only
    deterministic: bool = False  # deterministic kernels (CPU runs are bit-exact on resume regardless)
    progress: bool = True  # progress bar with loss, lr and images/s


@dataclass
class TrackConfig:
    mode: str = choice("offline", "offline", "online", "disabled")
    project: str = "byolc"
    entity: str = ""
    group: str = ""  # set by `launch pipeline` / `launch sweep`
    tags: List[str] = field(default_factory=list)


@dataclass
class LaunchConfig:
    """Where `python -m launch` runs the stage; ignored by `python -m STAGE`."""

    cluster: str = choice("local", "local", "slurm", "debug")
    folder: str = ""  # submitit logs; "" = <run_root>/submitit
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    nodes: int = 1
    tasks_per_node: int = 1  # > 1: DDP with one process per task
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: int = 8
    timeout_min: int = 0  # 0: no limit for a local run, 60 min on Slurm
    # This stage's share of `python -m launch pipeline FILE budget_min=N` (the shares of a
    # pipeline's stages sum to 1); it becomes the stage's train.budget_min (launch/pipeline.py).
    budget_share: float = 0.0
    array_parallelism: int = 16
    slurm_extra: Dict[str, Any] = field(default_factory=dict)  # any other sbatch parameter


@dataclass
class StageConfig:
    """Fields every stage has. A stage's artifact dir is <run_root>/<stage>/<name>."""

    name: str = "default"
    run_root: str = "runs"
    seed: int = 0
    # A run folder holds one config (core/rundir.py): rerunning it with another is refused unless
    overwrite: bool = False  # true: delete the folder's previous run and start afresh
    resume: str = choice("auto", "auto", "force")  # force: continue its checkpoint under this config
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


# `AugmentConfig` lives in core.augment beside the code that reads it.
__all__ = [
    "AugmentConfig", "DataConfig", "ModelConfig", "TrainConfig", "EvalConfig", "EngineConfig",
    "TrackConfig", "LaunchConfig", "StageConfig", "choice", "load_config", "to_yaml",
    "parse_overrides",
]


# ----------------------------------------------------------------------------- loading


def parse_overrides(overrides: List[str]) -> Any:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise UserError(f"override {bad[0]!r} is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise UserError(f"cannot parse overrides {overrides}: {e.msg if hasattr(e, 'msg') else e}") from None


def read_yaml(path: str | Path) -> Any:
    """A config file's mapping; every way it can be wrong is one line naming the file (and the
    line and column of a YAML error)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"cannot parse {path}{where}: {problem}") from None
    if not isinstance(raw, DictConfig):
        raise UserError(f"{path}: the top level must be a mapping (key: value lines), not a {type(raw).__name__[:-6].lower()}")
    if not raw:
        raise UserError(f"{path} is empty: a config file holds at least one key (see configs/)")
    return raw


def stage_layers(raw: Any, stage: str | None, path: Any = "", section: str | None = None) -> List[Any]:
    """A pipeline file (top-level `common:` and `stages:`) gives a stage `common` then its own section.

    So one file describes a whole pipeline and any stage in it still runs alone:
    `python -m byol configs/quickstart.yaml` reads `common` + `stages.byol`. A pipeline of named
    steps (`stages.<step>.stage: prune`, launch/pipeline.py) reads `stages.<section>`, minus
    its `stage:` key, which must name this stage.
    """
    if not isinstance(raw, DictConfig) or "stages" not in raw:
        return [raw]
    extra = set(raw.keys()) - {"common", "stages"}
    if extra:
        raise UserError(f"{path}: a pipeline file has only 'common' and 'stages' at the top; found {sorted(extra)}")
    if stage is None:
        raise UserError(f"{path} is a pipeline file; run it with `python -m launch pipeline {path}`")
    section = section or stage
    if section not in raw.stages:
        raise UserError(f"{path} has no section stages.{section}; it has: {', '.join(raw.stages.keys())}")
    own = raw.stages[section] or OmegaConf.create({})
    if isinstance(own, DictConfig) and "stage" in own:
        if own.stage != stage:
            raise UserError(f"{path}: stages.{section} is a {own.stage} step, not {stage}; run it with "
                            f"`python -m launch pipeline {path}`")
        own = OmegaConf.create({k: v for k, v in OmegaConf.to_container(own).items() if k != "stage"})
    return [raw.get("common") or OmegaConf.create({}), own]


def load_config(schema: Type[T], path: str | Path | None = None, overrides: List[str] = (),
                stage: str | None = None, section: str | None = None) -> T:
    """defaults(schema) <- YAML file (or its stage's sections) <- overrides, strictly.

    section: the pipeline step to read (`stages.<section>`); default: the stage's own name."""
    base = OmegaConf.structured(schema)
    layers = []
    if path is not None:
        layers += stage_layers(read_yaml(path), stage, path, section)
    layers.append(parse_overrides(list(overrides)))
    merged = base
    for layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except ConfigKeyError as e:
            raise UserError(_unknown_key_message(schema, e.full_key or str(e.key))) from None
        except ValidationError as e:
            raise UserError(_bad_value_message(schema, e)) from None
        except OmegaConfBaseException as e:
            raise UserError(f"bad config: {str(e).splitlines()[0]}") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # e.g. a mandatory (???) value left unset
        raise UserError(f"bad config value for '{getattr(e, 'full_key', '')}': {str(e).splitlines()[0]}") from None
    check_choices(cfg)
    check_numbers(cfg)
    return cfg


# (key, test, what it must be): numbers every stage reads, checked before any work
NUMBERS = (
    ("train.batch_size", lambda v: v >= 1, ">= 1"),
    ("train.lr", lambda v: v >= 0, ">= 0"),
    ("train.weight_decay", lambda v: v >= 0, ">= 0"),
    ("train.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("train.budget_min", lambda v: v >= 0, ">= 0 (0: no time budget)"),
    ("train.max_steps", lambda v: v >= 0, ">= 0 (0: no limit)"),
    ("train.checkpoint_every_steps", lambda v: v >= 0, ">= 0 (0: every epoch)"),
    ("data.val_fraction", lambda v: 0 <= v < 1, ">= 0 and < 1"),
    ("data.image_size", lambda v: v >= 8, ">= 8"),
    ("eval.knn_k", lambda v: v >= 1, ">= 1"),
    ("eval.knn_every_epochs", lambda v: v >= 0, ">= 0 (0: only at the end)"),
    ("eval.probe_epochs", lambda v: v >= 1, ">= 1"),
    ("launch.timeout_min", lambda v: v >= 0, ">= 0 (0: none locally, 60 on Slurm)"),
)


def check_numbers(cfg: Any) -> None:
    # train.epochs=0 made a "finished" untrained artifact; prune alone means it (prune, no recovery)
    least = getattr(cfg, "least_train_epochs", 1)
    train = getattr(cfg, "train", None)
    if train is not None and getattr(train, "epochs", least) < least:
        raise UserError(f"bad value for 'train.epochs': {train.epochs}; expected >= {least}")
    for key, ok, expected in NUMBERS:
        node = cfg
        for part in key.split("."):
            node = getattr(node, part, None)
        if isinstance(node, (int, float)) and not isinstance(node, bool) and not ok(node):
            raise UserError(f"bad value for '{key}': {node}; expected {expected}")


def check_choices(cfg: Any, prefix: str = "") -> None:
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            check_choices(value, key + ".")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            if isinstance(value, str) and value.lower() in f.metadata["choices"]:
                setattr(cfg, f.name, value.lower())  # YAML's true/false reach a str field as "True"/"False"
                continue
            raise UserError(f"bad value for '{key}': {value!r}; choices: {', '.join(f.metadata['choices'])}")


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def _schema_at(schema: Any, dotted: str):
    """The dataclass type that holds the last component of `dotted` (None if not a section)."""
    node = schema
    for part in dotted.split(".")[:-1]:
        sub = {f.name: f for f in fields(node)}.get(part)
        if sub is None:
            return None
        default = sub.default_factory() if callable(sub.default_factory) else sub.default
        if not is_dataclass(default):
            return None
        node = type(default)
    return node


def _unknown_key_message(schema: Any, key: str) -> str:
    parent = _schema_at(schema, key)
    name = key.split(".")[-1]
    if parent is None:
        return f"unknown key '{key}'"
    valid = [f.name for f in fields(parent)]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    where = key.rsplit(".", 1)[0] + "." if "." in key else ""
    return f"unknown key '{key}'{hint} valid keys{' under ' + where[:-1] if where else ''}: {', '.join(valid)}"


def _bad_value_message(schema: Any, e: ValidationError) -> str:
    key = e.full_key or ""
    if "Incompatible value 'None'" in str(e.msg):  # `key=` with nothing after it
        return f"'{key}' is empty; give it a value ({key}=...)"
    expected = ""
    parent = _schema_at(schema, key) if key else None
    if parent is not None:
        f = {f.name: f for f in fields(parent)}.get(key.split(".")[-1])
        if f is not None:
            expected = f"; expected {getattr(f.type, '__name__', f.type)}"
    return f"bad value for '{key}': {str(e.msg).splitlines()[0]}{expected}"
