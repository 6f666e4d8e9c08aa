"""The pretraining config tree (MAE and BEiT) with its derived values and checks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from mimkit.config.core import ConfigError, check_choices, fail, positive
from mimkit.ranks import world_size

# train.attention: how the timm attention layers compute (mimkit.models.attention.set_attention)
AttentionMode = Literal["auto", "fused", "explicit"]
ATTENTION_MODES = get_args(AttentionMode)

__all__ = [
    "VIT_PRESETS",
    "DataConfig",
    "DecoderConfig",
    "EvalConfig",
    "KnnConfig",
    "MaskConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "RunConfig",
    "TargetConfig",
    "TokenizerRef",
    "TrainConfig",
    "resolve",
    "validate",
    "validate_data",
    "validate_optim",
    "validate_run",
    "validate_train",
]

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
    name: str = "folder"  # fashion_mnist | folder | synthetic | shards (pretraining only)
    root: str = "data/train"  # fashion_mnist: its four IDX files; shards: `mimkit data shard`'s
    split: str = "train"  # fashion_mnist: train | test
    max_samples: int | None = None  # use the first N samples (smoke runs)
    mean: list[float] | None = None  # null: the dataset's own statistics
    std: list[float] | None = None
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: float = 0.5
    num_workers: int = 0
    synthetic_size: int = 256  # number of images of the synthetic dataset
    shuffle_buffer: int = 1000  # shards: samples held in the streaming shuffle buffer
    # an image folder's undecodable files: skip (listed in the run's skipped_images.jsonl;
    # more than max_bad_images distinct files stop the run) or error (stop at the first)
    bad_images: Literal["skip", "error"] = "skip"
    max_bad_images: int = 100


@dataclass
class DecoderConfig:
    embed_dim: int = 512
    depth: int = 8
    num_heads: int = 16


@dataclass
class ModelConfig:
    # mae: visible tokens only + decoder | beit: full sequence + mask token
    method: Literal["mae", "beit"] = "mae"
    arch: str = "vit_base"  # a key of VIT_PRESETS or "custom"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int | None = None  # null: from the preset
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    # recompute each block's activations in the backward pass: less memory, ~1/3 more compute
    grad_checkpointing: bool = False
    decoder: DecoderConfig = field(default_factory=DecoderConfig)  # MAE only
    # MAE only: the encoder sees every position, the masked ones as a learned mask token (MAE
    # Table 1c "encoder w/ [M]"; slower, the paper's point of comparison)
    mask_token_in_encoder: bool = False
    # BEiT only
    layer_scale: float | None = 0.1  # initial layer-scale value; null disables
    rel_pos_bias: Literal["shared", "per_layer", "none"] = "shared"  # shared: pretraining
    abs_pos_emb: bool = False


@dataclass
class MaskConfig:
    # random (MAE) | blockwise (BEiT Algorithm 1; MAE Table 1f "block") | grid (MAE Fig. 6: one
    # patch of every s x s cell kept, s from mask.ratio = 1 - 1/s^2)
    strategy: Literal["random", "blockwise", "grid"] = "random"
    ratio: float = 0.75  # fraction masked; blockwise uses num_masked when given
    num_masked: int | None = None  # blockwise: patches masked per image (BEiT: 75 of 196)
    min_block: int = 16  # blockwise: minimum block area in patches (16 for a 14x14 grid)


@dataclass
class TargetConfig:
    kind: Literal["pixels", "tokens"] = "pixels"  # tokens: a tokenizer's visual tokens (BEiT)
    norm_pix: bool = True  # per-patch normalized pixels (MAE Sec. 4, "w/ norm")
    # all: "recover 100% visual tokens" (BEiT Table 4)
    loss_on: Literal["masked", "all"] = "masked"


@dataclass
class TokenizerRef:
    checkpoint: str | None = None  # a tokenizer .safetensors (mimkit tokenizer train / convert)
    img_size: int | None = None  # the tokenizer view; null: what the tokenizer was trained on
    # applied to both views (BEiT), brightness/contrast for grayscale; 0 for other channel counts
    color_jitter: float = 0.4
    cache: bool = False  # precompute the visual tokens once; needs fixed views (no augmentation)


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
    # after warm-up: cosine (MAE, BEiT) | linear (to min_lr; segmentation)
    schedule: Literal["cosine", "linear"] = "cosine"


@dataclass
class TrainConfig:
    epochs: int = 800
    batch_size: int = 64  # per process, per micro-step
    # the papers' batch, the same on any number of processes: optim.accum_steps is derived from
    # it (global = batch_size x accum_steps x processes, which must divide it) and the lr follows
    # it; null: the batch is batch_size x optim.accum_steps x processes
    global_batch_size: int | None = None
    # DeiT's repeated augmentation (BEiT Table 6, CIFAR-100: 3): each image k times per epoch,
    # each copy augmented apart and sent to another process; an epoch keeps its length (so it
    # holds 1/k of the images); 1: off
    repeated_aug: int = 1
    max_steps: int | None = None  # stop after N optimizer steps; the schedule still follows epochs
    steps: int | None = (
        None  # a budget in optimizer steps instead of epochs (the schedule spans it)
    )
    # auto (bf16 where the device computes it natively, fp32 elsewhere; resolved when the config
    # is loaded, saved resolved) | fp32 | bf16 | fp16 (autocast; fp16 with a GradScaler)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # a non-finite loss or gradient norm: stop (before the optimizer step; the last checkpoint
    # stays intact) or skip that step, at most max_skipped_steps times in a run
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10
    # under torchrun: ddp (replicas, gradients all-reduced) or fsdp (FSDP2: parameters,
    # gradients and optimizer states sharded over the ranks)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # torch.compile the model (in place: checkpoint keys are unchanged), as HF's torch_compile
    compile: bool = False
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = "default"
    compile_backend: str = "inductor"  # any of torch._dynamo.list_backends(); eager: a check
    # attention: fused (torch's scaled_dot_product_attention) | explicit (matmuls + softmax) |
    # auto (explicit in bf16 on CPU, where it is faster; fused elsewhere)
    attention: AttentionMode = "auto"
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
    pool: Literal["avg", "cls"] = "avg"
    train_samples: int | None = None  # null: the whole training split
    test_samples: int | None = None
    batch_size: int = 256
    # image folders with class subfolders, required for k-NN when data.name is "folder"
    train_root: str | None = None
    test_root: str | None = None


@dataclass
class HealthConfig:
    # score the run on held-out images every N epochs and at the end (mimkit.tasks.health);
    # null: never
    every_epochs: int | None = 1
    images: int = 256  # held-out images scored (the evaluation split's first ones)
    knn_train: int = 2000  # labeled training images of the small k-NN (0: no k-NN)
    window: int = 3  # warn when the held-out loss has not improved for this many evaluations


@dataclass
class EvalConfig:
    knn: KnnConfig = field(default_factory=KnnConfig)
    health: HealthConfig = field(default_factory=HealthConfig)


@dataclass
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    tokenizer: TokenizerRef = field(default_factory=TokenizerRef)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def resolve(self) -> None:
        resolve(self)

    def validate(self) -> None:
        validate(self)


def resolve(cfg: PretrainConfig) -> PretrainConfig:
    """Fill derived values: ViT preset sizes and the absolute lr (base_lr * eff. batch / 256)."""
    m = cfg.model
    if m.arch in VIT_PRESETS:
        width, depth, heads = VIT_PRESETS[m.arch]
        m.embed_dim = width if m.embed_dim is None else m.embed_dim
        m.depth = depth if m.depth is None else m.depth
        m.num_heads = heads if m.num_heads is None else m.num_heads
    resolve_batch_and_lr(cfg.optim, cfg.train)
    return cfg


def scaled_lr(base_lr: float, batch: int) -> float:
    """The linear scaling rule of the MAE and BEiT recipes: lr = base_lr x batch / 256."""
    return base_lr * batch / 256


def resolve_batch_and_lr(o: OptimConfig, t: TrainConfig) -> None:
    """``train.global_batch_size`` -> ``optim.accum_steps`` for this number of processes (one line
    naming both keys when it does not divide), then the absolute lr (when not given) from the
    effective batch ``batch_size x accum_steps x processes``."""
    procs = world_size()
    g = t.global_batch_size
    if g is not None and g > 0 and t.batch_size > 0:
        per_step = t.batch_size * procs
        on = f" x {procs} processes" if procs > 1 else ""
        if g % per_step:
            raise ConfigError(
                f"train.global_batch_size={g} is not a multiple of train.batch_size="
                f"{t.batch_size}{on} = {per_step}: choose a per-process batch that divides it"
            )
        accum = g // per_step
        if o.accum_steps not in (1, accum):
            raise ConfigError(
                f"optim.accum_steps={o.accum_steps} contradicts train.global_batch_size={g} "
                f"(train.batch_size={t.batch_size}{on} needs {accum}): leave optim.accum_steps "
                "out, it is derived"
            )
        o.accum_steps = accum
    if o.lr is None and o.base_lr > 0 and t.batch_size > 0 and o.accum_steps > 0:
        o.lr = scaled_lr(o.base_lr, t.batch_size * o.accum_steps * procs)


def validate(cfg: PretrainConfig) -> None:
    """Check ranges and relations between values. Raises :class:`ConfigError` (one line)."""
    check_choices(cfg)
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    h = cfg.eval.health
    if h.every_epochs is not None:
        positive("eval.health.every_epochs", h.every_epochs)
    positive("eval.health.images", h.images)
    positive("eval.health.window", h.window)
    if h.knn_train < 0:
        fail("eval.health.knn_train", h.knn_train, "must be >= 0 (0: no k-NN)")
    if m.arch not in VIT_PRESETS and m.arch != "custom":
        fail("model.arch", m.arch, f"one of {[*VIT_PRESETS, 'custom']}")
    for key in ("embed_dim", "depth", "num_heads"):
        if getattr(m, key) is None:
            fail(f"model.{key}", None, "required when model.arch is 'custom'")
        positive(f"model.{key}", getattr(m, key))
    for key in ("img_size", "patch_size", "in_chans"):
        positive(f"model.{key}", getattr(m, key))
    if m.img_size % m.patch_size:
        fail("model.img_size", m.img_size, f"must be divisible by model.patch_size={m.patch_size}")
    if m.embed_dim % m.num_heads:
        fail("model.embed_dim", m.embed_dim, f"must be divisible by model.num_heads={m.num_heads}")
    positive("model.mlp_ratio", m.mlp_ratio)
    if not 0 <= m.drop_path < 1:
        fail("model.drop_path", m.drop_path, "must be in [0, 1)")
    dec = m.decoder
    for key in ("embed_dim", "depth", "num_heads"):
        positive(f"model.decoder.{key}", getattr(dec, key))
    if dec.embed_dim % dec.num_heads:
        fail(
            "model.decoder.embed_dim",
            dec.embed_dim,
            f"must be divisible by model.decoder.num_heads={dec.num_heads}",
        )

    _validate_masking(cfg)

    validate_data(d, in_chans=m.in_chans, streaming=True)
    if d.name == "shards":
        _validate_shards(cfg)
        if t.repeated_aug != 1:
            fail("train.repeated_aug", t.repeated_aug, "1 with data.name=shards (a stream)")
    validate_optim(o, t)
    validate_train(t)
    validate_run(cfg.run)
    knn = cfg.eval.knn
    positive("eval.knn.k", knn.k)
    positive("eval.knn.temperature", knn.temperature)
    positive("eval.knn.batch_size", knn.batch_size)
    if knn.enabled and d.name in ("folder", "shards"):
        for key in ("train_root", "test_root"):
            root = getattr(knn, key)
            if root is None or not Path(root).is_dir():
                fail(
                    f"eval.knn.{key}",
                    root,
                    f"a folder of class subfolders (k-NN on data.name={d.name})",
                )
    for key in ("train_samples", "test_samples"):
        if getattr(knn, key) is not None:
            positive(f"eval.knn.{key}", getattr(knn, key))


def _validate_masking(cfg: PretrainConfig) -> None:
    m, mask, target = cfg.model, cfg.mask, cfg.target
    if not 0 < mask.ratio < 1:
        fail("mask.ratio", mask.ratio, "must be in the open interval (0, 1)")
    num_patches = (m.img_size // m.patch_size) ** 2
    if int(num_patches * (1 - mask.ratio)) < 1:
        fail("mask.ratio", mask.ratio, f"leaves no visible patch out of {num_patches}")
    if mask.num_masked is not None and not 0 < mask.num_masked < num_patches:
        fail("mask.num_masked", mask.num_masked, f"must be in (0, {num_patches}) patches")
    positive("mask.min_block", mask.min_block)
    if mask.strategy == "grid":
        from mimkit.masking import grid_step

        try:
            grid_step(mask.ratio)
        except ValueError as err:
            fail("mask.ratio", mask.ratio, str(err))
    if m.mask_token_in_encoder and m.method != "mae":
        fail("model.mask_token_in_encoder", True, "MAE only (BEiT's encoder always has one)")
    if m.layer_scale is not None:
        positive("model.layer_scale", m.layer_scale)
    tok = cfg.tokenizer
    needs_tokenizer = target.kind == "tokens"
    if needs_tokenizer and (tok.checkpoint is None or not Path(tok.checkpoint).is_file()):
        fail(
            "tokenizer.checkpoint",
            tok.checkpoint,
            "a tokenizer .safetensors file (train one with `mimkit tokenizer train`)",
        )
    if tok.img_size is not None:
        positive("tokenizer.img_size", tok.img_size)
    if not 0 <= tok.color_jitter < 1:
        fail("tokenizer.color_jitter", tok.color_jitter, "must be in [0, 1)")
    if m.method == "beit" and tok.color_jitter > 0 and m.in_chans not in (1, 3):
        why = f"0 for {m.in_chans} channels (colour jitter is defined for grayscale and RGB)"
        fail("tokenizer.color_jitter", tok.color_jitter, why)
    if tok.cache:
        d = cfg.data
        fixed = list(d.crop_scale) == [1.0, 1.0] and d.hflip == 0 and tok.color_jitter == 0
        if not fixed:
            fail(
                "tokenizer.cache",
                True,
                "needs fixed views: data.crop_scale=[1.0,1.0] data.hflip=0 "
                "tokenizer.color_jitter=0 (augmented views change the tokens every epoch)",
            )


def _validate_shards(cfg: PretrainConfig) -> None:
    """``data.name=shards``: a shard directory with its manifest, explicit normalization."""
    d = cfg.data
    if not (Path(d.root) / "manifest.json").is_file():
        fail("data.root", d.root, "a directory of shards with manifest.json (`mimkit data shard`)")
    for key in ("mean", "std"):
        if getattr(d, key) is None:
            fail(f"data.{key}", None, "needed with data.name=shards (a stream has no statistics)")
    if d.max_samples is not None:
        fail("data.max_samples", d.max_samples, "not with data.name=shards (shard fewer images)")
    positive("data.shuffle_buffer", d.shuffle_buffer)
    if cfg.tokenizer.cache:
        fail("tokenizer.cache", True, "not with data.name=shards (it needs indexable data)")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".npy")


def has_images(root: str | Path, *, max_dirs: int = 2000) -> bool:
    """Whether ``root`` or a folder below it holds an image file. Stops at the first one, and
    after ``max_dirs`` folders without one says True: the data set's own listing decides."""
    for seen, (_, _, files) in enumerate(os.walk(root, followlinks=True)):
        if seen >= max_dirs or any(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in files):
            return True
    return False


def validate_data(
    d: DataConfig, *, in_chans: int, chans_key: str = "model.in_chans", streaming: bool = False
) -> None:
    names = ["fashion_mnist", "folder", "synthetic", *(["shards"] if streaming else [])]
    if d.name not in names:
        fail("data.name", d.name, f"one of {names}")
    if d.name != "synthetic" and not Path(d.root).exists():
        hint = (
            " (install Debian's dataset-fashion-mnist, or point data.root at a folder with the four"
            " Fashion-MNIST IDX files)"
            if d.name == "fashion_mnist"
            else ""
        )
        fail("data.root", d.root, f"the path does not exist{hint}")
    if d.name == "folder":
        if not Path(d.root).is_dir():
            fail("data.root", d.root, "a folder of images (data.name=folder)")
        if not has_images(d.root):
            fail(
                "data.root",
                d.root,
                f"no images in it or its subfolders (looked for {', '.join(IMAGE_SUFFIXES)})",
            )
    if d.name == "fashion_mnist":
        if d.split not in ("train", "test"):
            fail("data.split", d.split, "one of ['train', 'test']")
        if in_chans != 1:
            fail(chans_key, in_chans, "Fashion-MNIST is grayscale: use 1")
    if d.max_samples is not None:
        positive("data.max_samples", d.max_samples)
    if d.max_bad_images < 0:
        fail("data.max_bad_images", d.max_bad_images, "must be >= 0")
    for key in ("mean", "std"):
        value = getattr(d, key)
        if value is not None and len(value) != in_chans:
            fail(f"data.{key}", value, f"needs one value per channel ({chans_key}={in_chans})")
    if d.std is not None and any(s <= 0 for s in d.std):
        fail("data.std", d.std, "every value must be positive")
    lo_hi = d.crop_scale
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
        fail("data.crop_scale", lo_hi, "[min, max] with 0 < min <= max <= 1")
    if not 0 <= d.hflip <= 1:
        fail("data.hflip", d.hflip, "a probability in [0, 1]")
    if d.num_workers < 0:
        fail("data.num_workers", d.num_workers, "must be >= 0")
    positive("data.synthetic_size", d.synthetic_size)


def validate_optim(o: OptimConfig, t: TrainConfig) -> None:
    if o.name != "adamw":
        fail("optim.name", o.name, "one of ['adamw']")
    positive("optim.base_lr", o.base_lr)
    positive("optim.accum_steps", o.accum_steps)
    positive("train.batch_size", t.batch_size)
    positive("optim.lr", o.lr)  # derived from the three above when not given
    if o.min_lr < 0 or o.min_lr > o.lr:
        fail("optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr:g}]")
    if o.weight_decay < 0:
        fail("optim.weight_decay", o.weight_decay, "must be >= 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        fail("optim.betas", o.betas, "two numbers in [0, 1)")
    positive("optim.eps", o.eps)
    if o.warmup_epochs < 0:
        fail("optim.warmup_epochs", o.warmup_epochs, "must be >= 0")
    if o.clip_grad is not None:
        positive("optim.clip_grad", o.clip_grad)


def validate_train(t: TrainConfig) -> None:
    positive("train.repeated_aug", t.repeated_aug)
    if t.global_batch_size is not None:
        positive("train.global_batch_size", t.global_batch_size)
    positive("train.epochs", t.epochs)
    if t.max_steps is not None:
        positive("train.max_steps", t.max_steps)
    if t.steps is not None:
        positive("train.steps", t.steps)
    if t.max_skipped_steps < 0:
        fail("train.max_skipped_steps", t.max_skipped_steps, "must be >= 0")
    if t.compile:
        import torch._dynamo

        if t.compile_backend not in torch._dynamo.list_backends(exclude_tags=None):
            usual = sorted({*torch._dynamo.list_backends(), "eager", "aot_eager"})
            fail("train.compile_backend", t.compile_backend, f"a torch.compile backend: {usual}")
        if t.compile_mode != "default" and t.compile_backend != "inductor":
            fail("train.compile_mode", t.compile_mode, "only 'default' with a backend other than "
                 f"inductor (train.compile_backend={t.compile_backend!r})")  # fmt: skip
    for key in ("log_every_steps", "ckpt_every_epochs", "keep_last", "figure_every_epochs"):
        positive(f"train.{key}", getattr(t, key))
    if t.ckpt_every_steps is not None:
        positive("train.ckpt_every_steps", t.ckpt_every_steps)


def validate_run(r: RunConfig) -> None:
    if r.device not in ("auto", "cpu") and not r.device.startswith("cuda"):
        fail("run.device", r.device, "auto, cpu, cuda or cuda:N")
