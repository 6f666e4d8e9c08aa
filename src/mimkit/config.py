"""The typed configuration tree: YAML recipes + dotted overrides -> validated dataclasses.

A recipe is a YAML mapping whose keys mirror :class:`PretrainConfig`. Overrides are dotlist items
(``optim.lr=1e-3``) applied after the file. Loading goes through OmegaConf structured configs, which
reject unknown keys and values of the wrong type; :func:`validate` then checks the ranges and the
relations between values. Any problem becomes one :class:`ConfigError` whose message names the
file, the key, the value and what is allowed. Derived values (presets, the absolute learning rate)
are resolved once by :func:`resolve` and saved with the run; the config is not mutated afterwards.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

__all__ = [
    "VIT_PRESETS",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "MaskConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "RunConfig",
    "TargetConfig",
    "TrainConfig",
    "load_config",
    "resolve",
    "save_config",
    "validate",
]


class ConfigError(ValueError):
    """A user error in a recipe or an override. ``str(err)`` is one line, meant to be printed."""


# ViT sizes of the ViT / DeiT / MAE papers: (width, depth, heads).
VIT_PRESETS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}


@dataclass
class RunConfig:
    dir: str = "runs/pretrain"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False  # torch.use_deterministic_algorithms; bitwise resume on CPU


@dataclass
class DataConfig:
    name: str = "folder"  # fashion_mnist | folder | synthetic
    root: str = "data/train"  # fashion_mnist: the folder of its four IDX files
    split: str = "train"  # fashion_mnist: train | test
    max_samples: int | None = None  # use the first N samples (smoke runs)
    mean: list[float] | None = None  # null: the dataset's own statistics
    std: list[float] | None = None
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: float = 0.5
    num_workers: int = 0
    synthetic_size: int = 256  # number of images of the synthetic dataset


@dataclass
class DecoderConfig:
    embed_dim: int = 512
    depth: int = 8
    num_heads: int = 16


@dataclass
class ModelConfig:
    method: str = "mae"
    arch: str = "vit_base"  # a key of VIT_PRESETS or "custom"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int | None = None  # null: from the preset
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class MaskConfig:
    strategy: str = "random"  # MAE: per-sample random masking by shuffling
    ratio: float = 0.75


@dataclass
class TargetConfig:
    kind: str = "pixels"
    norm_pix: bool = True  # per-patch normalized pixels (MAE Sec. 4, "w/ norm")


@dataclass
class OptimConfig:
    name: str = "adamw"
    base_lr: float = 1.5e-4  # lr = base_lr * effective batch / 256 when lr is null
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_epochs: float = 40.0
    clip_grad: float | None = None
    accum_steps: int = 1


@dataclass
class TrainConfig:
    epochs: int = 800
    batch_size: int = 64  # per process, per micro-step
    max_steps: int | None = None  # stop after N optimizer steps; the schedule still follows epochs
    precision: str = "fp32"  # fp32 | bf16
    log_every_steps: int = 10
    ckpt_every_epochs: int = 1
    ckpt_every_steps: int | None = None
    keep_last: int = 2
    figure_every_epochs: int = 10


@dataclass
class KnnConfig:
    enabled: bool = False
    k: int = 20
    temperature: float = 0.07
    pool: str = "avg"  # avg | cls
    train_samples: int | None = None  # null: the whole training split
    test_samples: int | None = None
    batch_size: int = 256
    # image folders with class subfolders, required for k-NN when data.name is "folder"
    train_root: str | None = None
    test_root: str | None = None


@dataclass
class EvalConfig:
    knn: KnnConfig = field(default_factory=KnnConfig)


@dataclass
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_ = MISSING  # re-exported for recipes of later commands that need required keys


# --------------------------------------------------------------------------------------------
# loading


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        # safe_load: no Python tags, no arbitrary objects
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def _omegaconf_message(err: OmegaConfBaseException, source: str) -> str:
    key = getattr(err, "full_key", None) or "?"
    msg = str(getattr(err, "msg", "") or err).splitlines()[0]
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        return f"{source}: unknown key '{key}'" + (f" (not a key of '{parent}')" if parent else "")
    return f"{source}: bad value for '{key}': {msg}"


def _check_shape(data: Any, schema: type, source: str, prefix: str = "") -> None:
    """Sections must be mappings and list-valued keys lists, before OmegaConf sees the data."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the recipe"
        raise ConfigError(f"{source}: '{where}' must be a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in data.items():
        f = fields.get(key)
        if f is None:
            continue  # OmegaConf reports unknown keys with their full name
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            _check_shape(value, type(default), source, f"{prefix}{key}.")
        elif "list" in str(f.type) and value is not None and not isinstance(value, list):
            raise ConfigError(f"{source}: bad value for '{prefix}{key}': {value!r} is not a list")


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    schema: type = PretrainConfig,
) -> Any:
    """Load a recipe, apply dotlist ``overrides``, validate and resolve it.

    Returns an instance of ``schema`` (by default :class:`PretrainConfig`) with presets and the
    absolute learning rate filled in. Raises :class:`ConfigError` with a one-line message.
    """
    base = OmegaConf.structured(schema)
    source = str(path) if path is not None else "<defaults>"
    try:
        if path is not None:
            data = _read_yaml(Path(path))
            _check_shape(data, schema, source)
            base = OmegaConf.merge(base, OmegaConf.create(data))
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err, source)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key = item.split("=", 1)[0]
        try:
            patch = OmegaConf.from_dotlist([item])
            _check_shape(OmegaConf.to_container(patch), schema, f"override '{key}'")
            base = OmegaConf.merge(base, patch)
        except OmegaConfBaseException as err:
            raise ConfigError(_omegaconf_message(err, f"override '{key}'")) from None
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': the value is not valid YAML") from None
    try:
        cfg = OmegaConf.to_object(base)
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err, source)) from None
    cfg = resolve(cfg)
    validate(cfg)
    return cfg


def resolve(cfg: PretrainConfig) -> PretrainConfig:
    """Fill derived values: ViT preset sizes and the absolute lr (base_lr * eff. batch / 256)."""
    m = cfg.model
    if m.arch in VIT_PRESETS:
        width, depth, heads = VIT_PRESETS[m.arch]
        m.embed_dim = width if m.embed_dim is None else m.embed_dim
        m.depth = depth if m.depth is None else m.depth
        m.num_heads = heads if m.num_heads is None else m.num_heads
    if cfg.optim.lr is None and cfg.optim.base_lr > 0 and cfg.train.batch_size > 0:
        eff = cfg.train.batch_size * max(cfg.optim.accum_steps, 1) * _world_size()
        cfg.optim.lr = cfg.optim.base_lr * eff / 256
    return cfg


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _positive(key: str, value: float | int | None) -> None:
    if value is None or not (value > 0) or (isinstance(value, float) and math.isinf(value)):
        _fail(key, value, "must be a positive number")


def validate(cfg: PretrainConfig) -> None:
    """Check ranges and relations between values. Raises :class:`ConfigError` (one line)."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    if m.method != "mae":
        _fail("model.method", m.method, "one of ['mae'] (BEiT arrives with its own recipes)")
    if m.arch not in VIT_PRESETS and m.arch != "custom":
        _fail("model.arch", m.arch, f"one of {[*VIT_PRESETS, 'custom']}")
    for key in ("embed_dim", "depth", "num_heads"):
        if getattr(m, key) is None:
            _fail(f"model.{key}", None, "required when model.arch is 'custom'")
        _positive(f"model.{key}", getattr(m, key))
    for key in ("img_size", "patch_size", "in_chans"):
        _positive(f"model.{key}", getattr(m, key))
    if m.img_size % m.patch_size:
        _fail("model.img_size", m.img_size, f"must be divisible by model.patch_size={m.patch_size}")
    if m.embed_dim % m.num_heads:
        _fail("model.embed_dim", m.embed_dim, f"must be divisible by model.num_heads={m.num_heads}")
    if m.in_chans not in (1, 3):
        _fail("model.in_chans", m.in_chans, "1 (grayscale) or 3 (RGB)")
    _positive("model.mlp_ratio", m.mlp_ratio)
    if not 0 <= m.drop_path < 1:
        _fail("model.drop_path", m.drop_path, "must be in [0, 1)")
    dec = m.decoder
    for key in ("embed_dim", "depth", "num_heads"):
        _positive(f"model.decoder.{key}", getattr(dec, key))
    if dec.embed_dim % dec.num_heads:
        _fail(
            "model.decoder.embed_dim",
            dec.embed_dim,
            f"must be divisible by model.decoder.num_heads={dec.num_heads}",
        )

    if cfg.mask.strategy != "random":
        _fail("mask.strategy", cfg.mask.strategy, "one of ['random'] for MAE")
    if not 0 < cfg.mask.ratio < 1:
        _fail("mask.ratio", cfg.mask.ratio, "must be in the open interval (0, 1)")
    num_patches = (m.img_size // m.patch_size) ** 2
    if int(num_patches * (1 - cfg.mask.ratio)) < 1:
        _fail("mask.ratio", cfg.mask.ratio, f"leaves no visible patch out of {num_patches}")
    if cfg.target.kind != "pixels":
        _fail("target.kind", cfg.target.kind, "one of ['pixels'] for MAE")

    if d.name not in ("fashion_mnist", "folder", "synthetic"):
        _fail("data.name", d.name, "one of ['fashion_mnist', 'folder', 'synthetic']")
    if d.name != "synthetic" and not Path(d.root).exists():
        hint = (
            " (install Debian's dataset-fashion-mnist, or point data.root at a folder with the four"
            " Fashion-MNIST IDX files)"
            if d.name == "fashion_mnist"
            else ""
        )
        _fail("data.root", d.root, f"the path does not exist{hint}")
    if d.name == "fashion_mnist":
        if d.split not in ("train", "test"):
            _fail("data.split", d.split, "one of ['train', 'test']")
        if m.in_chans != 1:
            _fail("model.in_chans", m.in_chans, "Fashion-MNIST is grayscale: use 1")
    if d.max_samples is not None:
        _positive("data.max_samples", d.max_samples)
    for key in ("mean", "std"):
        value = getattr(d, key)
        if value is not None and len(value) != m.in_chans:
            _fail(
                f"data.{key}", value, f"needs one value per channel (model.in_chans={m.in_chans})"
            )
    if d.std is not None and any(s <= 0 for s in d.std):
        _fail("data.std", d.std, "every value must be positive")
    lo_hi = d.crop_scale
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
        _fail("data.crop_scale", lo_hi, "[min, max] with 0 < min <= max <= 1")
    if not 0 <= d.hflip <= 1:
        _fail("data.hflip", d.hflip, "a probability in [0, 1]")
    if d.num_workers < 0:
        _fail("data.num_workers", d.num_workers, "must be >= 0")
    _positive("data.synthetic_size", d.synthetic_size)

    if o.name != "adamw":
        _fail("optim.name", o.name, "one of ['adamw']")
    _positive("optim.base_lr", o.base_lr)
    _positive("optim.accum_steps", o.accum_steps)
    _positive("train.batch_size", t.batch_size)
    _positive("optim.lr", o.lr)  # derived from the three above when not given
    if o.min_lr < 0 or o.min_lr > o.lr:
        _fail("optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr:g}]")
    if o.weight_decay < 0:
        _fail("optim.weight_decay", o.weight_decay, "must be >= 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        _fail("optim.betas", o.betas, "two numbers in [0, 1)")
    _positive("optim.eps", o.eps)
    if o.warmup_epochs < 0:
        _fail("optim.warmup_epochs", o.warmup_epochs, "must be >= 0")
    if o.clip_grad is not None:
        _positive("optim.clip_grad", o.clip_grad)

    _positive("train.epochs", t.epochs)
    if t.max_steps is not None:
        _positive("train.max_steps", t.max_steps)
    if t.precision not in ("fp32", "bf16"):
        _fail("train.precision", t.precision, "one of ['fp32', 'bf16']")
    for key in ("log_every_steps", "ckpt_every_epochs", "keep_last", "figure_every_epochs"):
        _positive(f"train.{key}", getattr(t, key))
    if t.ckpt_every_steps is not None:
        _positive("train.ckpt_every_steps", t.ckpt_every_steps)

    knn = cfg.eval.knn
    _positive("eval.knn.k", knn.k)
    _positive("eval.knn.temperature", knn.temperature)
    _positive("eval.knn.batch_size", knn.batch_size)
    if knn.pool not in ("avg", "cls"):
        _fail("eval.knn.pool", knn.pool, "one of ['avg', 'cls']")
    if knn.enabled and d.name == "folder":
        for key in ("train_root", "test_root"):
            root = getattr(knn, key)
            if root is None or not Path(root).is_dir():
                _fail(
                    f"eval.knn.{key}",
                    root,
                    "a folder of class subfolders (k-NN on data.name=folder)",
                )
    for key in ("train_samples", "test_samples"):
        if getattr(knn, key) is not None:
            _positive(f"eval.knn.{key}", getattr(knn, key))
    if cfg.run.device not in ("auto", "cpu") and not cfg.run.device.startswith("cuda"):
        _fail("run.device", cfg.run.device, "auto, cpu, cuda or cuda:N")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (the run directory's ``config.yaml``)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
