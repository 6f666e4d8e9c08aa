"""Config trees of the downstream commands: ``finetune``, ``linprobe`` and ``knn``.

They share the data section (a training split with an optional label fraction, and an evaluation
split) and the model section (an encoder from a checkpoint, or built from scratch). Architecture
keys left null are read from the ``model.init`` checkpoint's provenance when the config is
resolved, so the saved ``config.yaml`` states the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mimkit.config.core import (
    ConfigError,
    check_choices,
    fail,
    native_bf16,
    positive,
    renamed,
)
from mimkit.config.pretrain import (
    VIT_PRESETS,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    resolve_batch_and_lr,
    scaled_lr,
    validate_data,
    validate_optim,
    validate_run,
    validate_train,
)

__all__ = [
    "AugmentConfig",
    "ClassifyDataConfig",
    "EmaConfig",
    "EncoderConfig",
    "FinetuneConfig",
    "FinetuneEvalConfig",
    "FinetuneOptimConfig",
    "KnnCommandConfig",
    "KnnEvalConfig",
    "LinprobeConfig",
    "ProbeConfig",
]


@dataclass
class ClassifyDataConfig(DataConfig):
    # evaluation split: fashion_mnist/synthetic use eval_split; folder needs eval_root (class
    # subfolders, as data.root)
    eval_split: str = "test"
    eval_root: str | None = None
    eval_max_samples: int | None = None
    # evaluation: resize the short side to img_size / eval_crop_pct, center-crop img_size (timm's
    # crop_pct; 0.875 = 224/256 is the official MAE/BEiT/DeiT ImageNet evaluation); 1: no border cut
    eval_crop_pct: float = 1.0
    # a seeded, class-balanced subset of the training labels (1.0: all of them)
    label_fraction: float = 1.0
    label_seed: int | None = None  # null: run.seed
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])


_ARCH_KEYS = ("method", "arch", "img_size", "patch_size", "in_chans", "embed_dim", "depth",
              "num_heads", "mlp_ratio")  # fmt: skip


@dataclass
class EncoderConfig:
    """The encoder (and head) of a downstream run.

    ``init``: a mimkit checkpoint (a pretraining run directory, its ``encoder.safetensors``, a
    ``checkpoints/ckpt-*`` directory, or a fine-tuned ``model_*.safetensors``), or null to start
    from random weights (the from-scratch baseline). Null architecture keys come from ``init``.
    """

    init: str | None = None
    method: Literal["mae", "beit"] | None = None  # mae: plain ViT
    arch: str | None = None
    img_size: int | None = None  # differs from init's: position tables are interpolated
    patch_size: int | None = None
    in_chans: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    layer_scale: float | None = None  # BEiT; null: init's (0.1 from scratch); 0 disables
    # BEiT: null -> per_layer (the shared table copied per block)
    rel_pos_bias: Literal["shared", "per_layer", "none"] | None = None
    abs_pos_emb: bool | None = None  # BEiT; null: init's (false from scratch)
    drop_path: float = 0.1
    grad_checkpointing: bool = False  # recompute block activations in backward (less memory)
    # avg: mean of patch tokens + fc_norm (BEiT, MAE global pool) | cls
    pool: Literal["avg", "cls"] = "avg"
    num_classes: int | None = None  # null: from the training data
    head_init_std: float = 2e-5  # MAE: trunc_normal(2e-5); BEiT: 0.02 * init_scale 0.001
    # fine-tuning: train only the last k blocks (and the final norm and head), the patch
    # embedding, tokens, position tables and earlier blocks frozen: MAE's partial fine-tuning
    # (Fig. 9; k=0 trains the head alone); null: every parameter trains
    trainable_blocks: int | None = None

    def model_config(self) -> ModelConfig:
        """The resolved :class:`ModelConfig` for :func:`mimkit.models.build_encoder`."""
        return ModelConfig(
            method=self.method,
            arch=self.arch,
            img_size=self.img_size,
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            drop_path=self.drop_path,
            layer_scale=self.layer_scale or None,
            rel_pos_bias=self.rel_pos_bias,
            abs_pos_emb=bool(self.abs_pos_emb),
            grad_checkpointing=self.grad_checkpointing,
        )


def _saved_model_config(init: str) -> dict:
    """``model_config`` from ``init``'s provenance, read from the file's header without PyTorch
    (a run with only ``checkpoints/`` has its newest complete one verified first)."""
    from mimkit.weights import open_weights, provenance_model_config

    handle = open_weights(init)
    return provenance_model_config(handle.metadata, handle.path)


def resolve_encoder(e: EncoderConfig) -> None:
    """Fill null architecture keys from ``e.init``'s provenance, then from presets/defaults."""
    if e.init is not None and e.init.lower() in ("none", "scratch", ""):
        e.init = None
    if e.init is not None:
        try:
            saved = _saved_model_config(e.init)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"model.init={e.init!r}: {err}") from None
        for key in (*_ARCH_KEYS, "layer_scale", "abs_pos_emb"):
            if getattr(e, key) is None:
                setattr(e, key, saved.get(key))
        if e.method == "beit" and e.rel_pos_bias is None:
            e.rel_pos_bias = "per_layer" if saved.get("rel_pos_bias") != "none" else "none"
    if e.arch in VIT_PRESETS:
        width, depth, heads = VIT_PRESETS[e.arch]
        e.embed_dim = width if e.embed_dim is None else e.embed_dim
        e.depth = depth if e.depth is None else e.depth
        e.num_heads = heads if e.num_heads is None else e.num_heads
    if e.mlp_ratio is None:
        e.mlp_ratio = 4.0
    if e.method == "beit":
        e.layer_scale = 0.1 if e.layer_scale is None else e.layer_scale
        e.rel_pos_bias = e.rel_pos_bias or "per_layer"
        e.abs_pos_emb = bool(e.abs_pos_emb)
    else:
        e.layer_scale, e.rel_pos_bias, e.abs_pos_emb = None, "none", False


def feature_precision(value: str, device: str) -> str:
    """``auto`` -> bf16 where ``device`` computes bf16 natively, else fp32 (frozen features)."""
    import os

    if value != "auto":
        return value
    forced = os.environ.get("MIMKIT_PRECISION_AUTO")
    if forced in ("bf16", "fp32"):
        return forced
    return "bf16" if native_bf16(device)[0] else "fp32"


def validate_encoder(e: EncoderConfig) -> None:
    for key in _ARCH_KEYS:
        if getattr(e, key) is None:
            fail(f"model.{key}", None, "required when model.init is null (training from scratch)")
    if e.arch not in VIT_PRESETS and e.arch != "custom":
        fail("model.arch", e.arch, f"one of {[*VIT_PRESETS, 'custom']}")
    for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
        positive(f"model.{key}", getattr(e, key))
    if e.img_size % e.patch_size:
        fail("model.img_size", e.img_size, f"must be divisible by model.patch_size={e.patch_size}")
    if e.embed_dim % e.num_heads:
        fail("model.embed_dim", e.embed_dim, f"must be divisible by model.num_heads={e.num_heads}")
    if not 0 <= e.drop_path < 1:
        fail("model.drop_path", e.drop_path, "must be in [0, 1)")
    if e.rel_pos_bias not in ("shared", "per_layer", "none"):
        fail("model.rel_pos_bias", e.rel_pos_bias, "one of ['shared', 'per_layer', 'none']")
    if e.layer_scale is not None and e.layer_scale < 0:
        fail("model.layer_scale", e.layer_scale, "must be >= 0 (0 disables layer scale)")
    if e.num_classes is not None:
        positive("model.num_classes", e.num_classes)
    positive("model.head_init_std", e.head_init_std)


def validate_classify_data(d: ClassifyDataConfig, *, in_chans: int) -> None:
    validate_data(d, in_chans=in_chans)
    if not 0 < d.label_fraction <= 1:
        fail("data.label_fraction", d.label_fraction, "must be in (0, 1]")
    if not 0 < d.eval_crop_pct <= 1:
        fail("data.eval_crop_pct", d.eval_crop_pct, "must be in (0, 1]")
    if d.eval_max_samples is not None:
        positive("data.eval_max_samples", d.eval_max_samples)
    if d.name == "fashion_mnist" and d.eval_split not in ("train", "test"):
        fail("data.eval_split", d.eval_split, "one of ['train', 'test']")
    if d.name == "folder":
        if d.eval_root is None or not Path(d.eval_root).is_dir():
            fail("data.eval_root", d.eval_root, "a folder of class subfolders (data.name=folder)")
        for key in ("root", "eval_root"):
            root = Path(getattr(d, key))
            if not any(p.is_dir() for p in root.iterdir()):
                fail(f"data.{key}", str(root), "needs class subfolders (one per label)")


@dataclass
class AugmentConfig:
    """Fine-tuning augmentation and label mixing (DeiT / BEiT / MAE recipes; timm's operators)."""

    rand_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm's RandAugment spec; null disables
    reprob: float = 0.25  # random erasing probability
    remode: Literal["pixel", "rand", "const"] = "pixel"
    mixup: float = 0.8  # Beta(alpha) for Mixup; 0 disables
    cutmix: float = 1.0  # Beta(alpha) for CutMix; 0 disables
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1  # label smoothing


@dataclass
class FinetuneOptimConfig(OptimConfig):
    base_lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_epochs: float = 5.0
    min_lr: float = 1e-6
    layer_decay: float = 0.75  # lr scale decay**(num_layers - 1 - layer id); 1 disables
    # the task head's lr = lr x head_lr_mult (mmsegmentation's decode-head lr_mult; SETR: 10)
    head_lr_mult: float = 1.0


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9999


@dataclass
class FinetuneEvalConfig:
    every_epochs: int = 1  # evaluate (on the validation split) every N epochs and at the end
    every_steps: int | None = None  # also every N optimizer steps (curves)


@dataclass
class FinetuneConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/finetune"))
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    model: EncoderConfig = field(default_factory=EncoderConfig)
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100, batch_size=64))
    ema: EmaConfig = field(default_factory=EmaConfig)
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)
    # older spellings, still read (with a deprecation warning)
    eval_every_epochs: int | None = None  # deprecated: eval.every_epochs
    eval_every_steps: int | None = None  # deprecated: eval.every_steps
    # held out of the labeled training images (seeded, class-balanced): the periodic evaluations
    # run on it and choose model_best; the evaluation split (data.eval_split / eval_root) is
    # scored once, at the end, with model_best's weights (test.json). 0: no validation split;
    # evaluations and the choice of model_best run on the evaluation split itself (the official
    # repos' practice, optimistic: the reported best is chosen on the data it is scored on)
    val_fraction: float = 0.1

    def resolve(self) -> None:
        for old in ("every_epochs", "every_steps"):
            value = getattr(self, f"eval_{old}")
            if value is not None:  # the older spelling: said once, moved to its new place
                renamed(f"eval_{old}", f"eval.{old}")
                setattr(self.eval, old, value)
                setattr(self, f"eval_{old}", None)
        resolve_encoder(self.model)
        resolve_batch_and_lr(self.optim, self.train)

    def validate(self) -> None:
        check_choices(self)
        validate_encoder(self.model)
        validate_classify_data(self.data, in_chans=self.model.in_chans)
        validate_optim(self.optim, self.train)
        validate_train(self.train)
        validate_run(self.run)
        if not 0 < self.optim.layer_decay <= 1:
            fail("optim.layer_decay", self.optim.layer_decay, "must be in (0, 1]")
        if not self.optim.head_lr_mult > 0:
            fail("optim.head_lr_mult", self.optim.head_lr_mult, "must be > 0")
        k = self.model.trainable_blocks
        if k is not None and not 0 <= k <= self.model.depth:
            fail("model.trainable_blocks", k, f"in [0, model.depth={self.model.depth}] or null")
        a = self.aug
        for key in ("reprob", "mixup_prob", "mixup_switch_prob"):
            if not 0 <= getattr(a, key) <= 1:
                fail(f"aug.{key}", getattr(a, key), "a probability in [0, 1]")
        for key in ("mixup", "cutmix"):
            if getattr(a, key) < 0:
                fail(f"aug.{key}", getattr(a, key), "must be >= 0 (0 disables)")
        if not 0 <= a.smoothing < 1:
            fail("aug.smoothing", a.smoothing, "must be in [0, 1)")
        if a.rand_augment is not None and self.model.in_chans not in (1, 3):
            fail("aug.rand_augment", a.rand_augment,
                 f"null for {self.model.in_chans} channels (RandAugment works on grayscale and "
                 "RGB images)")  # fmt: skip
        if a.rand_augment is not None:
            from timm.data.auto_augment import rand_augment_transform

            try:
                rand_augment_transform(a.rand_augment, {})
            except Exception as err:  # timm raises assorted errors for a malformed spec
                fail("aug.rand_augment", a.rand_augment, f"a timm RandAugment spec ({err})")
        if not 0 < self.ema.decay < 1:
            fail("ema.decay", self.ema.decay, "must be in (0, 1)")
        positive("eval.every_epochs", self.eval.every_epochs)
        if not 0 <= self.val_fraction < 1:
            fail("val_fraction", self.val_fraction, "must be in [0, 1) (0: no validation split)")
        if self.eval.every_steps is not None:
            positive("eval.every_steps", self.eval.every_steps)


@dataclass
class ProbeConfig:
    """Linear probing on frozen, cached features (MAE's and BEiT's protocols)."""

    # cls_avg: cls and avg-pool concatenated (DINO's ViT-B probe)
    pool: Literal["avg", "cls", "cls_avg"] = "avg"
    # all: every block probed, the best chosen on held-out data (BEiT)
    layers: Literal["last", "all"] = "last"
    last_blocks: int = 1  # DINO's n_last_blocks: the last N blocks' features concatenated
    optimizer: Literal["lars", "sgd"] = "lars"  # lars: MAE
    base_lr: float = 0.1  # lr = base_lr * batch / 256
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 90
    warmup_epochs: float = 10.0
    batch_size: int = 16384
    val_fraction: float = 0.1  # held out of the training split to choose the layer (layers=all)
    raw_pixels: bool = True  # also probe raw pixels with the same protocol (the baseline)
    feature_batch_size: int = 256
    # the frozen encoder's forward: auto (bf16 autocast where the device computes bf16
    # natively, as train.precision=auto) | fp32 | bf16; the probe itself trains in fp32
    precision: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass
class LinprobeConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/linprobe"))
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    model: EncoderConfig = field(default_factory=lambda: EncoderConfig(drop_path=0.0))
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def resolve(self) -> None:
        resolve_encoder(self.model)
        p = self.probe
        if p.lr is None and p.base_lr > 0 and p.batch_size > 0:
            p.lr = scaled_lr(p.base_lr, p.batch_size)
        p.precision = feature_precision(p.precision, self.run.device)

    def validate(self) -> None:
        check_choices(self)
        validate_encoder(self.model)
        validate_classify_data(self.data, in_chans=self.model.in_chans)
        validate_run(self.run)
        p = self.probe
        for key in ("base_lr", "lr", "epochs", "batch_size", "feature_batch_size"):
            positive(f"probe.{key}", getattr(p, key))
        if not 0 <= p.momentum < 1:
            fail("probe.momentum", p.momentum, "must be in [0, 1)")
        if p.weight_decay < 0:
            fail("probe.weight_decay", p.weight_decay, "must be >= 0")
        if not 0 <= p.warmup_epochs <= p.epochs:
            fail("probe.warmup_epochs", p.warmup_epochs, f"must be in [0, probe.epochs={p.epochs}]")
        if not isinstance(p.last_blocks, int) or not 1 <= p.last_blocks <= self.model.depth:
            depth = self.model.depth
            fail("probe.last_blocks", p.last_blocks, f"an integer in [1, model.depth={depth}]")
        if p.last_blocks > 1 and p.layers != "last":
            fail("probe.last_blocks", p.last_blocks, "must be 1 with probe.layers=all")
        if not 0 < p.val_fraction < 1 and p.layers == "all":
            fail("probe.val_fraction", p.val_fraction, "must be in (0, 1) with probe.layers=all")


@dataclass
class KnnEvalConfig:
    k: int = 20
    temperature: float = 0.07
    pool: Literal["avg", "cls"] = "avg"
    layer: int = -1  # which block's output (0-based; -1 the last, with the final norm)
    batch_size: int = 256
    raw_pixels: bool = True  # also report k-NN on raw pixels
    # the encoder's forward: auto (bf16 where native) | fp32 | bf16
    precision: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass
class KnnCommandConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/knn"))
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    model: EncoderConfig = field(default_factory=lambda: EncoderConfig(drop_path=0.0))
    knn: KnnEvalConfig = field(default_factory=KnnEvalConfig)

    def resolve(self) -> None:
        resolve_encoder(self.model)
        self.knn.precision = feature_precision(self.knn.precision, self.run.device)

    def validate(self) -> None:
        check_choices(self)
        validate_encoder(self.model)
        validate_classify_data(self.data, in_chans=self.model.in_chans)
        validate_run(self.run)
        k = self.knn
        for key in ("k", "temperature", "batch_size"):
            positive(f"knn.{key}", getattr(k, key))
        if not -self.model.depth <= k.layer < self.model.depth:
            fail(
                "knn.layer", k.layer, f"a block index in [-{self.model.depth}, {self.model.depth})"
            )
