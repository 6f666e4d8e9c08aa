"""``mimkit bench``: how fast a pretraining recipe's model trains on this machine, and beside what.

On random inputs of the recipe's shape, with random weights: (1) the training step (forward,
backward, AdamW; bf16 = ``torch.autocast``): images/s, step time over rounds, peak memory, FLOPs
per step (``FlopCounterMode``, one forward + backward) and MFU against the device's matmul peak
measured in the same run and dtype; (2) ``compare``: the same model and batch, interleaved
round by round, against Hugging Face's ``ViTMAEForPreTraining`` / ``BeitForMaskedImageModeling``
(SDPA and/or eager attention, equal sizes) and, for MAE, against itself with the encoder on the
full sequence (the MAE paper's "encoder w/ [M]", Table 2c); (3) the recipe's training
DataLoader alone. BEiT's targets are random visual-token ids: no tokenizer runs. The measuring
pieces: :mod:`mimkit.engine.perf`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from mimkit.commands.bench import HF_ATTENTION
from mimkit.config import ConfigError, PretrainConfig, load_config, to_dict
from mimkit.config import validate as validate_pretrain
from mimkit.engine import perf
from mimkit.engine.perf import Workload
from mimkit.masking import Mask, mask_from_bool
from mimkit.models.attention import fused_attention_wanted, set_attention
from mimkit.tasks.pretrain import mask_sampler

__all__ = [
    "BenchConfig",
    "BenchResult",
    "CompareStats",
    "DataStats",
    "Side",
    "TrainStats",
    "data_throughput",
    "format_report",
    "load_bench_config",
    "run_bench",
    "run_command",
]

PRECISIONS = ("fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_VOCAB_SIZE = 8192  # the DALL-E tokenizer's, as in the BEiT paper
HF_ARCHITECTURES = {"mae": "ViTMAEForPreTraining", "beit": "BeitForMaskedImageModeling"}
NAMES = {"mae": "MAE", "beit": "BEiT"}


@dataclasses.dataclass
class BenchConfig(PretrainConfig):
    """A pretraining recipe as the benchmark reads it: BEiT's ``tokenizer.checkpoint`` may be
    absent, since the benchmark never loads a tokenizer (its targets are random token ids)."""

    def validate(self) -> None:
        if self.model.method == "beit" and self.target.kind == "tokens":
            pixels = dataclasses.replace(self.target, kind="pixels")  # every check but the file
            validate_pretrain(dataclasses.replace(self, target=pixels))
        else:
            validate_pretrain(self)


def load_bench_config(path: str | Path, overrides: Sequence[str] = ()) -> BenchConfig:
    """A pretraining recipe plus dotlist overrides; raises :class:`ConfigError` (one line)."""
    return load_config(path, list(overrides), schema=BenchConfig)


# ---- results ----


@dataclasses.dataclass
class TrainStats:
    """The training step at one precision."""

    precision: str
    batch_size: int
    steps: int  # per timed round
    rounds: int
    images_per_s: float  # batch_size / step time
    step_ms: float  # median over the rounds of (round time / steps)
    step_ms_min: float
    step_ms_max: float
    peak_memory_mib: float
    memory_kind: str  # what peak_memory_mib measures on this device
    flops_per_step: int  # forward + backward (FlopCounterMode)
    achieved_tflops: float  # flops_per_step / step time
    matmul_peak_tflops: float  # square matmuls in this precision's dtype
    mfu: float  # achieved / matmul peak, a fraction
    optimizer: str  # the AdamW implementation: fused | foreach
    attention: str = "fused"  # fused | explicit, as train.attention resolves on this device


@dataclasses.dataclass
class Side:
    """One workload of an interleaved comparison."""

    name: str  # mimkit | hf (SDPA) | hf_eager | full_sequence
    label: str
    images_per_s: float  # median over the rounds
    step_ms: float
    round_images_per_s: list[float]
    flops_per_step: int


@dataclasses.dataclass
class CompareStats:
    precision: str
    steps: int
    rounds: int
    sides: list[Side]
    ratios: dict[str, float]  # "mimkit/<side>": median over rounds of the images/s ratio


@dataclasses.dataclass
class DataStats:
    dataset: str
    num_workers: int
    batch_size: int
    batches: int
    images_per_s: float


@dataclasses.dataclass
class BenchResult:
    config: str | None
    method: str
    model: dict[str, Any]
    vocab_size: int | None
    machine: dict[str, Any]
    train: list[TrainStats]
    compare: list[CompareStats]
    data: DataStats | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- the workloads: ours, Hugging Face's, MAE on the full sequence ----


def _tokenizer_meta(cfg: PretrainConfig) -> dict[str, Any]:
    """The tokenizer file's metadata (vocabulary, image size) when it exists; never its weights."""
    from safetensors import SafetensorError

    from mimkit.engine.checkpoint import read_metadata

    path = cfg.tokenizer.checkpoint
    if cfg.model.method == "beit" and path and Path(path).is_file():
        with contextlib.suppress(OSError, SafetensorError):  # unreadable: as if absent
            return read_metadata(path)
    return {}


def _optimizer(model: nn.Module, cfg: PretrainConfig) -> tuple[torch.optim.AdamW, str]:
    """AdamW over the trainer's parameter groups (fused where torch has it, else foreach)."""
    from mimkit.engine.optim import adamw, param_groups

    o = cfg.optim
    return adamw(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)


class _Inputs(NamedTuple):
    imgs: torch.Tensor  # (B, C, H, W)
    mask: torch.Tensor | None  # (B, N) bool, True = masked: the pipeline's masks, if any
    ids: torch.Tensor | None  # (B, N) random visual-token ids (BEiT)


def _inputs(cfg: PretrainConfig, batch: int, vocab: int | None, device) -> _Inputs:
    m = cfg.model
    g = torch.Generator().manual_seed(cfg.run.seed)
    imgs = torch.randn(batch, m.in_chans, m.img_size, m.img_size, generator=g)
    sampler = mask_sampler(cfg)
    mask = torch.stack([sampler(g) for _ in range(batch)]) if sampler else None
    n = (m.img_size // m.patch_size) ** 2
    ids = torch.randint(vocab, (batch, n), generator=g) if vocab else None
    return _Inputs(*(t.to(device) if t is not None else None for t in (imgs, mask, ids)))


def _mimkit_loss(cfg: PretrainConfig, model: nn.Module, x: _Inputs) -> Callable[[], torch.Tensor]:
    """The step of ``mimkit pretrain``'s task (MAEPretrainTask / BEiTPretrainTask)."""
    from mimkit.models.beit import mim_pixel_loss, mim_token_loss
    from mimkit.targets import pixel_target

    # made once, outside the timed steps (mask_from_bool checks counts: a device sync); None:
    # MAE draws random masks in its forward
    mask = mask_from_bool(x.mask) if x.mask is not None else None

    def mae() -> torch.Tensor:
        return model.loss(x.imgs, model(x.imgs, mask=mask))

    def beit() -> torch.Tensor:
        out = model(x.imgs, mask)
        if x.ids is not None:
            return mim_token_loss(out.pred, x.ids, out.index)[0]
        t = pixel_target(x.imgs, cfg.model.patch_size, norm_pix=cfg.target.norm_pix)
        return mim_pixel_loss(out.pred, t, out.index)

    return mae if cfg.model.method == "mae" else beit


def _full_sequence_loss(model: nn.Module, x: _Inputs) -> Callable[[], torch.Tensor]:
    """The same MAE with its encoder on all 1+N tokens (the MAE paper's "encoder w/ [M]"), the
    decoder and the loss unchanged. Putting [M] in place of the masked patches costs nothing
    measurable, so this encoder sees the patches themselves."""
    from mimkit.models.mae import MAEOutput

    b, n, device = x.imgs.shape[0], model.encoder.num_patches, x.imgs.device
    order = torch.arange(n, device=device).expand(b, n)  # nothing masked: identity order
    all_kept = Mask(torch.zeros(b, n, dtype=torch.bool, device=device), order, order)

    def full() -> torch.Tensor:
        mask = model.mask(b, device=device)  # the loss region, random as MAE's
        latent = model.encoder.forward_features(x.imgs)  # (B, 1+N, D): every patch
        return model.loss(x.imgs, MAEOutput(model.decode(latent, all_kept), mask, latent))

    return full


def _transformers():
    try:
        import transformers
    except ImportError:
        msg = "--compare needs Hugging Face transformers (pip install 'transformers>=5,<6')"
        raise ConfigError(msg) from None
    return transformers


def _hf_model(cfg: PretrainConfig, model: nn.Module, attention: str = "sdpa") -> nn.Module:
    """The Hugging Face model of the same sizes: random weights, ``attention`` (sdpa | eager)."""
    from mimkit.interop.hf import to_hf

    transformers, arch = _transformers(), HF_ARCHITECTURES[cfg.model.method]
    # shapes only (meta tensors): to_hf derives the HF config from them
    state = model.state_dict()
    shapes = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
    _, hf_cfg = to_hf(shapes, model_config=cfg.model, architecture=arch,
                      mask_ratio=cfg.mask.ratio, norm_pix_loss=cfg.target.norm_pix)  # fmt: skip
    hf_cfg.pop("mimkit", None)
    hf_cfg["layer_norm_eps"] = 1e-6
    mae = cfg.model.method == "mae"
    config_class = transformers.ViTMAEConfig if mae else transformers.BeitConfig
    return getattr(transformers, arch)(
        config_class.from_dict(hf_cfg, attn_implementation=attention)
    )


def _hf_loss(cfg: PretrainConfig, hf: nn.Module, x: _Inputs) -> Callable[[], torch.Tensor]:
    if cfg.model.method == "mae":  # HF draws its random mask in forward, as ours does
        return lambda: hf(pixel_values=x.imgs).loss
    labels = x.ids[x.mask]  # (M,) the targets of the masked positions
    return lambda: hf(pixel_values=x.imgs, bool_masked_pos=x.mask, labels=labels).loss


# ---- the benchmark ----


def _measure(
    cfg: PretrainConfig, precision: str, *, batch: int, vocab: int | None, steps: int,
    warmup: int, rounds: int, compare: bool, peak: float, device: torch.device,
    hf_attention: Sequence[str] = ("sdpa",),
) -> tuple[TrainStats, CompareStats | None]:  # fmt: skip
    """The training step at one precision; with ``compare``, the interleaved comparison."""
    from mimkit.models import build_beit, build_mae

    torch.manual_seed(cfg.run.seed)
    x, method = _inputs(cfg, batch, vocab, device), cfg.model.method
    run = dict(device_type=device.type, bf16=precision == "bf16", clip_grad=cfg.optim.clip_grad)
    with perf.PeakMemory(device) as mem:  # weights, gradients, optimizer state, activations
        model = build_mae(cfg) if method == "mae" else build_beit(cfg, vocab_size=vocab)
        model = model.to(device).train()
        # train.attention resolved once for this device and precision: the path the row reports
        wanted = fused_attention_wanted(cfg.train.attention, device_type=device.type,
                                        precision=precision)  # fmt: skip
        attention = "fused" if wanted else "explicit"
        set_attention(model, attention, device_type=device.type, precision=precision)
        opt, impl = _optimizer(model, cfg)
        loss = _mimkit_loss(cfg, model, x)
        ours = Workload("mimkit", f"mimkit {NAMES[method]}", loss, opt, **run)
        flops = ours.warm_up(warmup)  # eager: the FLOPs are counted on the eager step
        if cfg.train.compile:  # train.compile=true: our step compiled as the trainer does
            model.compile(mode=cfg.train.compile_mode, backend=cfg.train.compile_backend)
            for _ in range(max(warmup, 2)):  # compilation happens here, untimed
                ours.step()
        times = perf.time_rounds([ours], steps=steps, rounds=rounds, device=device)["mimkit"]
    step = statistics.median(times)
    train = TrainStats(
        precision=precision, batch_size=batch, steps=steps, rounds=rounds,
        images_per_s=batch / step, step_ms=1e3 * step, step_ms_min=1e3 * min(times),
        step_ms_max=1e3 * max(times), peak_memory_mib=mem.peak_bytes / 2**20,
        memory_kind=mem.kind, flops_per_step=flops, achieved_tflops=flops / step / 1e12,
        matmul_peak_tflops=peak / 1e12, mfu=flops / step / peak, optimizer=impl,
        attention=attention,
    )  # fmt: skip
    if not compare:
        return train, None
    others = []
    for impl in hf_attention:  # "hf": SDPA, HF's default; "hf_eager": its explicit path
        hf = _hf_model(cfg, model, impl).to(device).train()
        name = "hf" if impl == "sdpa" else f"hf_{impl}"
        label = f"HF {HF_ARCHITECTURES[method]} ({impl})"
        others.append(Workload(name, label, _hf_loss(cfg, hf, x), _optimizer(hf, cfg)[0], **run))
    if method == "mae":  # the same module and optimizer, the whole sequence encoded
        label = "mimkit MAE, encoder on all tokens (MAE's 'encoder w/ [M]')"
        others.append(Workload("full_sequence", label, _full_sequence_loss(model, x), opt, **run))
    flops_of = {"mimkit": flops} | {w.name: w.warm_up(warmup) for w in others}
    t = perf.time_rounds([ours, *others], steps=steps, rounds=rounds, device=device)
    sides = [
        Side(w.name, w.label, batch / statistics.median(t[w.name]),
             1e3 * statistics.median(t[w.name]), [batch / s for s in t[w.name]], flops_of[w.name])
        for w in (ours, *others)
    ]  # fmt: skip
    # each round's ratio compares blocks run next to each other; the median of those
    ratios = {
        f"mimkit/{w.name}": statistics.median(
            a / b for a, b in zip(t[w.name], t["mimkit"], strict=True)
        )
        for w in others
    }
    return train, CompareStats(precision, steps, rounds, sides, ratios)


def data_throughput(
    cfg: PretrainConfig, *, batch_size: int, batches: int, tokenizer_size: int | None = None
) -> DataStats:
    """Images/s of the recipe's training DataLoader alone, built as ``mimkit pretrain`` builds
    it, over ``batches`` batches (:func:`~mimkit.engine.perf.time_loader`)."""
    from mimkit import data as md

    m, d = cfg.model, cfg.data
    base = md.build_dataset(d, img_size=m.img_size, channels=m.in_chans)
    mean, std = md.dataset_stats(d, base)
    sampler = mask_sampler(cfg)
    if m.method == "beit":
        tf = md.BEiTTransform(m.img_size, tokenizer_size or m.img_size, mean, std, mask_fn=sampler,
                             scale=d.crop_scale, hflip=d.hflip,
                             color_jitter=cfg.tokenizer.color_jitter)  # fmt: skip
    else:
        tf = md.PretrainTransform(m.img_size, mean, std, scale=d.crop_scale, hflip=d.hflip)
        tf = md.WithMask(tf, sampler) if sampler else tf
    view = md.AugmentedView(base, tf, seed=cfg.run.seed)
    order = md.ResumableSampler(len(view), seed=cfg.run.seed)
    if len(order) < batch_size:
        raise ConfigError(f"the dataset has {len(order)} images, less than a batch ({batch_size})")
    loader = md.make_loader(view, batch_size=batch_size, sampler=order, drop_last=True,
                            num_workers=d.num_workers, seed=cfg.run.seed)  # fmt: skip

    def set_epoch(epoch: int) -> None:
        order.set_epoch(epoch)
        view.set_epoch(epoch)

    seconds = perf.time_loader(loader, batches=batches, set_epoch=set_epoch)
    return DataStats(d.name, d.num_workers, batch_size, batches, batches * batch_size / seconds)


def run_bench(
    cfg: PretrainConfig,
    *,
    precisions: Sequence[str] | None = None,
    steps: int = 10,
    warmup: int = 3,
    rounds: int = 5,
    batch_size: int | None = None,
    compare: bool = False,
    data_batches: int = 20,
    matmul_size: int | None = None,
    config_path: str | None = None,
    hf_attention: Sequence[str] = ("sdpa",),
) -> BenchResult:
    """Benchmark the model of a pretraining recipe (see the module docstring).

    ``precisions``: a subset of ("fp32", "bf16"), by default the recipe's ``train.precision``;
    ``batch_size``: by default the recipe's; ``data_batches=0`` skips the data pipeline;
    ``matmul_size``: the side of the peak's square matmuls (default 8192 on CUDA, 1024 on CPU);
    ``hf_attention``: the Hugging Face attention implementations compared (sdpa, eager).
    """
    limits = {"steps": (steps, 1), "rounds": (rounds, 1), "warmup": (warmup, 0),
              "data-batches": (data_batches, 0), "batch-size": (batch_size, 1)}  # fmt: skip
    for key, (value, least) in limits.items():
        if value is not None and value < least:
            raise ConfigError(f"--{key}={value} is not allowed: must be >= {least}")
    if bad := [a for a in hf_attention if a not in HF_ATTENTION]:
        raise ConfigError(f"--hf-attention {bad[0]!r} is not allowed: one of {list(HF_ATTENTION)}")
    precisions = tuple(precisions or (cfg.train.precision,))
    if bad := [p for p in precisions if p not in PRECISIONS]:
        raise ConfigError(f"precision {bad[0]!r} is not allowed: one of {list(PRECISIONS)}")
    m, tokens = cfg.model, cfg.model.method == "beit" and cfg.target.kind == "tokens"
    if compare and m.method == "beit" and not tokens:
        raise ConfigError("--compare: Hugging Face's BEiT has no pixel head (target.kind=pixels)")
    from mimkit.engine.distributed import pick_device

    device = pick_device(cfg.run.device)
    meta = _tokenizer_meta(cfg)
    vocab = int(meta.get("vocab_size", DEFAULT_VOCAB_SIZE)) if tokens else None
    batch = batch_size or cfg.train.batch_size
    machine = perf.machine_facts(device)
    if compare:
        machine["transformers"] = _transformers().__version__
    tc = cfg.train
    machine["compile"] = f"{tc.compile_backend} ({tc.compile_mode})" if tc.compile else None
    train, comparisons = [], []
    for precision in precisions:
        peak = perf.matmul_peak(device, DTYPES[precision], size=matmul_size)
        t, c = _measure(cfg, precision, batch=batch, vocab=vocab, steps=steps, warmup=warmup,
                        rounds=rounds, compare=compare, peak=peak, device=device,
                        hf_attention=hf_attention)  # fmt: skip
        train.append(t)
        comparisons += [c] if c else []  # the next PeakMemory collects what this one left
    data = None
    if data_batches:
        tok_size = cfg.tokenizer.img_size or meta.get("img_size")
        data = data_throughput(cfg, batch_size=batch, batches=data_batches,
                               tokenizer_size=int(tok_size) if tok_size else None)  # fmt: skip
    return BenchResult(config_path, m.method, to_dict(m), vocab, machine, train, comparisons, data)


# ---- report and command ----


def format_report(r: BenchResult) -> str:
    """The readable report of a :class:`BenchResult` (Markdown tables)."""
    m, f = r.model, r.machine
    vocab = f", vocabulary {r.vocab_size} (random targets)" if r.vocab_size else ""
    lines = [
        f"mimkit bench {r.config or ''}: {NAMES[r.method]} {m['arch']} (width {m['embed_dim']}, "
        f"depth {m['depth']}, heads {m['num_heads']}), {m['img_size']} px, patch "
        f"{m['patch_size']}{vocab}",
        f"device {f['device']} ({f['device_name']}), torch {f['torch']}, {f['cpu_count']} CPUs, "
        f"{f['threads']} threads"
        + (f"; our step compiled with torch.compile, {f['compile']}" if f.get("compile") else ""),
        "",
        "| precision | attention | batch | images/s | step ms (min-max) | peak mem MiB "
        "| GFLOP/step | TFLOP/s | matmul peak TFLOP/s | MFU % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in r.train:
        lines.append(
            f"| {t.precision} | {t.attention} | {t.batch_size} | {t.images_per_s:.1f} | "
            f"{t.step_ms:.2f} "
            f"({t.step_ms_min:.2f}-{t.step_ms_max:.2f}) | {t.peak_memory_mib:.0f} | "
            f"{t.flops_per_step / 1e9:.3f} | {t.achieved_tflops:.3f} | "
            f"{t.matmul_peak_tflops:.3f} | {100 * t.mfu:.1f} |"
        )
    if r.train:
        lines.append(f"peak memory: {r.train[0].memory_kind}; AdamW: {r.train[0].optimizer}")
    if len(by := {t.precision: t.images_per_s for t in r.train}) == 2:
        lines.append(f"bf16 / fp32 images/s: {by['bf16'] / by['fp32']:.2f}x (measured one after "
                     "the other)")  # fmt: skip
    for c in r.compare:
        lines += [
            "",
            f"compare ({c.precision}, {c.rounds} interleaved rounds of {c.steps} steps):",
            "| | images/s | step ms | GFLOP/step | mimkit / this |",
            "|---|---|---|---|---|",
        ]
        for s in c.sides:
            ratio = c.ratios.get(f"mimkit/{s.name}")
            lines.append(
                f"| {s.label} | {s.images_per_s:.1f} | {s.step_ms:.2f} | "
                f"{s.flops_per_step / 1e9:.3f} | {f'{ratio:.2f}x' if ratio else '-'} |"
            )
    if r.data:
        d = r.data
        model = ", ".join(f"{t.precision} {t.images_per_s:.1f}" for t in r.train)
        lines += [
            "",
            f"data pipeline alone ({d.dataset}, {d.num_workers} worker(s), {d.batches} batches "
            f"of {d.batch_size}): {d.images_per_s:.1f} images/s; the model: {model} images/s",
        ]
    return "\n".join(lines)


def run_command(args: argparse.Namespace) -> int:
    """``mimkit bench`` on its parsed arguments: run, print the tables, write ``--json``."""
    cfg = load_bench_config(args.config, args.overrides)
    both = args.precision == "both"
    result = run_bench(
        cfg, precisions=PRECISIONS if both else args.precision and [args.precision],
        steps=args.steps, warmup=args.warmup, rounds=args.rounds, batch_size=args.batch_size,
        compare=args.compare, data_batches=args.data_batches, matmul_size=args.matmul_size,
        config_path=args.config,
        hf_attention=HF_ATTENTION if args.hf_attention == "both" else (args.hf_attention,),
    )  # fmt: skip
    print(format_report(result))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"\nwrote {out}")
    return 0
