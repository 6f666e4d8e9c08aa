"""``mimkit pretrain``: MAE or BEiT pretraining, figures, the encoder export and k-NN."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import torch

from mimkit import __version__
from mimkit.config import ConfigError, PretrainConfig, to_dict
from mimkit.data import (
    SKIP_REPORT,
    AugmentedView,
    BEiTTransform,
    EvalTransform,
    PretrainTransform,
    WithMask,
    bad_image_policy,
    build_dataset,
    dataset_stats,
)
from mimkit.data.shards import ShardStream
from mimkit.engine import checkpoint as ckpt
from mimkit.engine.distributed import is_main
from mimkit.engine.rundir import prepare_run, record_resolved
from mimkit.engine.task import StepOutput, TaskHooks
from mimkit.engine.trainer import Trainer, TrainResult
from mimkit.masking import MaskSampler, grid_mask, mask_from_bool, num_visible
from mimkit.models import build_beit, build_encoder, build_mae
from mimkit.models.beit import BEiT, mim_pixel_loss, mim_token_loss
from mimkit.models.mae import MAE, from_official_layout, to_official_layout
from mimkit.models.tokenizer_io import load_tokenizer
from mimkit.targets import pixel_target
from mimkit.tasks.health import health_evaluation
from mimkit.tasks.knn import KnnResult, knn_evaluate, knn_evaluate_pixels
from mimkit.viz import save_beit_figure, save_eval_curves, save_reconstruction_figure
from mimkit.weights import Provenance

__all__ = ["BEiTPretrainTask", "MAEPretrainTask", "PretrainResult", "run_pretrain"]


class BEiTPretrainTask(TaskHooks):
    """The trainer's task for BEiT: (patch view, tokenizer view, mask) -> MIM loss.

    With visual-token targets, the frozen tokenizer runs without gradients inside the step.
    """

    name = "pretrain"

    def __init__(
        self,
        model: BEiT,
        cfg: PretrainConfig,
        *,
        tokenizer: torch.nn.Module | None,
        tokenizer_meta: dict[str, Any] | None,
        mean: list[float],
        std: list[float],
    ) -> None:
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer
        self.tokenizer_meta, self.mean, self.std = tokenizer_meta or {}, mean, std
        self.device = next(model.parameters()).device
        self.num_masked = mask_sampler(cfg).num_masked  # what the pipeline's masks hold

    @torch.no_grad()
    def target_ids(self, tok_imgs: torch.Tensor) -> torch.Tensor:
        """Visual tokens (B, N) of the tokenizer view (B, C, T, T) in [0, 1], or cached ids."""
        if not tok_imgs.is_floating_point():  # from a TokenCache: already (B, N) ids
            return tok_imgs.long()
        return self.tokenizer.encode(tok_imgs).flatten(1)

    def step(self, batch: Any) -> StepOutput:
        (imgs, tok_imgs, mask_bool), _ = batch
        imgs = imgs.to(self.device, non_blocking=True)  # (B, C, H, W) normalized
        # (B, N) True = masked, as many per row as the sampler draws: nothing read back
        mask = mask_from_bool(mask_bool.to(self.device), num_masked=self.num_masked)
        out = self.model(imgs, mask)
        if self.model.vocab_size is not None:
            ids = self.target_ids(tok_imgs.to(self.device, non_blocking=True))
            loss, acc = mim_token_loss(out.pred, ids, out.index)
            return StepOutput(loss, {"mim_acc": acc})
        t = pixel_target(imgs, self.model.encoder.patch_size, norm_pix=self.cfg.target.norm_pix)
        return StepOutput(mim_pixel_loss(out.pred, t, out.index), {})

    def weights(self) -> dict[str, torch.Tensor]:
        """The official BEiT pretraining layout: encoder keys at the top level, ``lm_head``."""
        return to_official_layout(self.model.state_dict())

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        keyed = {(k if k.startswith("lm_head") else f"encoder.{k}"): v for k, v in state.items()}
        self.model.load_state_dict(keyed, strict=True)

    def metadata(self, *, decoder: bool = True) -> dict[str, Any]:
        return provenance(
            self.cfg,
            mean=self.mean,
            std=self.std,
            decoder=decoder,
            vocab_size=self.model.vocab_size,
            tokenizer_kind=self.tokenizer_meta.get("kind"),
        )


class TokenCache(torch.utils.data.Dataset):
    """A BEiT view whose tokenizer view is replaced by visual tokens computed once.

    Only for fixed views (validated by the config): the tokenizer then sees the same pixels every
    epoch, so its ids (N,) per image are computed in one pass and reused.
    """

    def __init__(self, view: AugmentedView, tokenizer, *, device, batch_size: int = 256) -> None:
        self.view = view
        ids = []
        with torch.no_grad():
            for start in range(0, len(view), batch_size):
                idx = range(start, min(start + batch_size, len(view)))
                tok = torch.stack([view[i][0][1] for i in idx]).to(device)  # (b, C, T, T)
                ids.append(tokenizer.encode(tok).flatten(1).to(torch.int32).cpu())  # (b, N)
        self.ids = torch.cat(ids)  # (len, N)

    def set_epoch(self, epoch: int) -> None:
        self.view.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.view)

    def __iter__(self):  # indexing past the end is a repeated augmentation: iterate explicitly
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int):
        (img, _, mask), label = self.view[i]
        # i >= len: a repeated augmentation of image i % len (its tokens are the image's own)
        return (img, self.ids[i % len(self.ids)], mask), label


class MAEPretrainTask(TaskHooks):
    """The trainer's task for MAE: batch -> masked-pixel loss, or the cross-entropy of a
    tokenizer's visual tokens (MAE Table 1d; the batch then holds BEiT's views)."""

    name = "pretrain"

    def __init__(
        self,
        model: MAE,
        cfg: PretrainConfig,
        *,
        mean: list[float],
        std: list[float],
        tokenizer: torch.nn.Module | None = None,
        tokenizer_meta: dict[str, Any] | None = None,
    ):
        self.model, self.cfg, self.mean, self.std = model, cfg, mean, std
        self.tokenizer, self.tokenizer_meta = tokenizer, tokenizer_meta or {}
        self.device = next(model.parameters()).device
        sampler = mask_sampler(cfg)
        self.num_masked = sampler.num_masked if sampler is not None else None

    @torch.no_grad()
    def target_ids(self, tok_imgs: torch.Tensor) -> torch.Tensor:
        """Visual tokens (B, N) of the tokenizer view in [0, 1], or cached ids."""
        if not tok_imgs.is_floating_point():  # from a TokenCache: already (B, N) ids
            return tok_imgs.long()
        return self.tokenizer.encode(tok_imgs).flatten(1)

    def step(self, batch: Any) -> StepOutput:
        x, mask, ids = batch[0], None, None
        if isinstance(x, (list, tuple)) and len(x) == 3:  # BEiT's views: visual-token targets
            x, tok_imgs, mask_bool = x
            ids = self.target_ids(tok_imgs.to(self.device, non_blocking=True))
            mask = mask_from_bool(mask_bool.to(self.device), num_masked=self.num_masked)
        elif isinstance(x, (list, tuple)):  # (images, (B, N) bool masks) from the pipeline
            x, mask_bool = x
            mask = mask_from_bool(mask_bool.to(self.device), num_masked=self.num_masked)
        imgs = x.to(self.device, non_blocking=True)  # (B, C, H, W) normalized
        out = self.model(imgs, mask=mask)  # no pipeline mask: random masking in the step (MAE)
        return StepOutput(loss=self.model.loss(imgs, out, ids), logs={})

    def weights(self) -> dict[str, torch.Tensor]:
        """The full MAE in the official layout (encoder keys are timm's)."""
        return to_official_layout(self.model.state_dict())

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(from_official_layout(state), strict=True)

    def metadata(self, *, decoder: bool = True) -> dict[str, Any]:
        return provenance(
            self.cfg, mean=self.mean, std=self.std, decoder=decoder,
            vocab_size=self.model.vocab_size, tokenizer_kind=self.tokenizer_meta.get("kind"),
        )  # fmt: skip


def provenance(
    cfg: PretrainConfig,
    *,
    mean: list[float],
    std: list[float],
    decoder: bool,
    vocab_size: int | None = None,
    tokenizer_kind: str | None = None,
) -> dict[str, Any]:
    """What a pretraining checkpoint is: stored as safetensors metadata (all values JSON strings).

    Method, target (and BEiT's tokenizer), masking, input (image/patch size, channels, mean/std),
    data and schedule (dataset, epochs, batch size), whether the decoder / MIM head is included,
    the layout of the keys and the whole ``model`` section; the writer adds ``step``/``epoch``.
    """
    m = cfg.model
    if cfg.target.kind == "tokens" and vocab_size is not None:
        target = "visual_tokens"
    else:
        target = "norm_pixels" if cfg.target.norm_pix else "pixels"
    if m.method == "mae":
        layout = "official-mae" if decoder else "timm-vit"
    else:
        layout = "official-beit" if decoder else "timm-beit"
    meta: dict[str, Any] = {
        "target": target,
        "mask_strategy": cfg.mask.strategy,
        "mask_ratio": cfg.mask.ratio,
        "num_masked": cfg.mask.num_masked,
        "loss_on": cfg.target.loss_on,
        "arch": m.arch,
        "img_size": m.img_size,
        "patch_size": m.patch_size,
        "in_chans": m.in_chans,
        "embed_dim": m.embed_dim,
        "depth": m.depth,
        "num_heads": m.num_heads,
        "mlp_ratio": m.mlp_ratio,
        "dataset": cfg.data.name,
        "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "includes_decoder": decoder,
    }
    if target == "visual_tokens":
        meta["vocab_size"] = vocab_size
        meta["tokenizer"] = {"checkpoint": cfg.tokenizer.checkpoint, "kind": tokenizer_kind}
    return Provenance(
        kind="pretrain" if decoder else "encoder", method=m.method, layout=layout,
        model_config=to_dict(m), mean=list(mean), std=list(std), created=ckpt.created_now(),
        mimkit_version=__version__, extra=meta,
    ).to_metadata()  # fmt: skip


@dataclasses.dataclass
class PretrainResult:
    run_dir: Path
    train: TrainResult
    encoder_path: Path | None
    figure_path: Path | None
    knn: dict[str, KnnResult]


def run_pretrain(cfg: PretrainConfig, *, resume: bool = False) -> PretrainResult:
    """Pretrain an MAE or a BEiT as ``cfg`` says; write everything to ``cfg.run.dir``."""
    run_dir, device = prepare_run(cfg, resume=resume)

    m = cfg.model
    if cfg.data.name == "shards":  # streamed: the first images, for the figures
        base = _shard_head(cfg, 8)
        mean, std = list(cfg.data.mean), list(cfg.data.std)  # validated: given
    else:
        base = build_dataset(
            cfg.data, img_size=m.img_size, channels=m.in_chans, report=run_dir / SKIP_REPORT
        )
        mean, std = dataset_stats(cfg.data, base)
    record_resolved(run_dir, {"data.mean": mean, "data.std": std})
    if m.method == "beit":
        task, train_view, fig_path, draw = _beit_setup(cfg, base, mean, std, device, run_dir)
    else:
        task, train_view, fig_path, draw = _mae_setup(cfg, base, mean, std, device, run_dir)
    d = cfg.data

    def on_epoch_end(epoch: int, final: bool) -> None:
        if final or epoch % cfg.train.figure_every_epochs == 0:
            draw(epoch)

    trainer = Trainer(
        task,
        train_view,
        optim=cfg.optim,
        train=cfg.train,
        run_dir=run_dir,
        device=device,
        seed=cfg.run.seed,
        num_workers=d.num_workers,
        evaluation=health_evaluation(cfg, task, mean=mean, std=std, device=device),
        on_epoch_end=on_epoch_end,
    )
    if resume:
        trainer.resume()
    result = trainer.fit()
    model = task.model  # under FSDP, rank 0's full copy of the trained model

    encoder_path = None
    knn: dict[str, KnnResult] = {}
    if is_main():
        save_eval_curves(run_dir, "health", metric="health_loss", title="held-out loss",
                         label="pretraining loss on held-out images")  # fmt: skip
        if result.stopped_early or not fig_path.exists():
            on_epoch_end(result.epoch, True)
        encoder_path = run_dir / "encoder.safetensors"
        enc_state = {k: v for k, v in model.encoder.state_dict().items() if k != "mask_token"}
        ckpt.save_weights(
            encoder_path,
            enc_state,
            {**task.metadata(decoder=False), "step": result.step, "epoch": result.epoch},
        )
        if cfg.eval.knn.enabled:
            knn = evaluate_knn(cfg, model.encoder, mean=mean, std=std, device=device)
            record = {name: dataclasses.asdict(r) for name, r in knn.items()}
            with (run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"kind": "eval", "step": result.step, "knn": record}) + "\n")
            (run_dir / "eval.json").write_text(json.dumps({"knn": record}, indent=2) + "\n")
    return PretrainResult(run_dir, result, encoder_path, fig_path, knn)


def mask_sampler(cfg: PretrainConfig) -> MaskSampler | None:
    """The data pipeline's mask sampler: BEiT's (blockwise or random, ``num_masked`` or
    ``ratio``), MAE's blockwise one (as many as random masking hides); None for MAE's random
    masks, drawn inside the step."""
    m, mk = cfg.model, cfg.mask
    grid = (m.img_size // m.patch_size,) * 2
    n = grid[0] * grid[1]
    if mk.strategy == "grid":  # MAE Fig. 6: one patch of every s x s cell, for either method
        return MaskSampler("grid", grid, int(grid_mask(grid, mk.ratio).sum()), ratio=mk.ratio)
    if m.method == "beit":
        k = mk.num_masked or max(1, round(mk.ratio * n))
        return MaskSampler(mk.strategy, grid, k, min_block=mk.min_block)
    if cfg.target.kind == "tokens" and mk.strategy == "random":  # masks beside the token view
        return MaskSampler("random", grid, n - num_visible(n, mk.ratio))
    if mk.strategy == "blockwise":
        k = mk.num_masked or n - num_visible(n, mk.ratio)
        return MaskSampler("blockwise", grid, k, min_block=mk.min_block)
    return None


def _shard_head(cfg: PretrainConfig, n: int) -> list[tuple[torch.Tensor, int]]:
    """The first ``n`` images of ``data.root``'s shards (in shard order, not shuffled)."""
    stream = ShardStream(
        cfg.data.root, channels=cfg.model.in_chans, shuffle=False, rank=0, world_size=1
    )
    return list(itertools.islice(iter(stream), n))


def _training_view(cfg: PretrainConfig, base, transform, run_dir: Path):
    """Training samples: a seeded view of the dataset, or the shards streamed (same seeding;
    undecodable images listed in the run's skip report, as for a folder)."""
    if cfg.data.name == "shards":
        d = cfg.data
        return ShardStream(
            d.root,
            channels=cfg.model.in_chans,
            transform=transform,
            seed=cfg.run.seed,
            buffer_size=d.shuffle_buffer,
            policy=bad_image_policy(d, run_dir / SKIP_REPORT),
        )
    return AugmentedView(base, transform, seed=cfg.run.seed)


def _mae_setup(cfg, base, mean, std, device, run_dir):
    """(task, training view, figure path, draw(epoch)) for MAE."""
    m, d = cfg.model, cfg.data
    if cfg.target.kind == "tokens":  # MAE Table 1d: BEiT's two views, the tokens as targets
        tokenizer, meta, tok_size = _checked_tokenizer(cfg, device)
        transform = BEiTTransform(
            m.img_size, tok_size, mean, std, mask_fn=mask_sampler(cfg), scale=d.crop_scale,
            hflip=d.hflip, color_jitter=cfg.tokenizer.color_jitter,
        )  # fmt: skip
        view = _training_view(cfg, base, transform, run_dir)
        if cfg.tokenizer.cache:
            view = TokenCache(view, tokenizer, device=device)
        model = build_mae(cfg, vocab_size=int(meta["vocab_size"])).to(device)
        task = MAEPretrainTask(
            model, cfg, mean=mean, std=std, tokenizer=tokenizer, tokenizer_meta=meta
        )
        return task, view, run_dir / "figures" / "reconstruction.png", lambda epoch: None
    transform = PretrainTransform(m.img_size, mean, std, scale=d.crop_scale, hflip=d.hflip)
    sampler = mask_sampler(cfg)  # blockwise: masks from the pipeline
    if sampler is not None:
        transform = WithMask(transform, sampler)
    view = _training_view(cfg, base, transform, run_dir)
    model = build_mae(cfg).to(device)
    task = MAEPretrainTask(model, cfg, mean=mean, std=std)
    eval_tf = EvalTransform(m.img_size, mean, std)
    imgs = torch.stack([eval_tf(base[i][0]) for i in range(min(8, len(base)))]).to(device)
    path = run_dir / "figures" / "reconstruction.png"

    def draw(epoch: int) -> None:
        save_reconstruction_figure(
            task.model, imgs, path, mean=mean, std=std, seed=cfg.run.seed,
            title=f"MAE reconstructions, epoch {epoch} (mask ratio {cfg.mask.ratio})",
        )  # fmt: skip

    return task, view, path, draw


def _checked_tokenizer(cfg: PretrainConfig, device):
    """(tokenizer, its metadata, the tokenizer view's size) for visual-token targets, checked
    against the ViT: the same token grid as the patch grid, the same channels."""
    m = cfg.model
    grid = (m.img_size // m.patch_size, m.img_size // m.patch_size)
    tokenizer, meta = load_tokenizer(cfg.tokenizer.checkpoint, device=device)
    tok_size = cfg.tokenizer.img_size or int(meta["img_size"])
    tok_grid = tok_size // int(meta["downsample"])
    if (tok_grid, tok_grid) != grid:
        raise ConfigError(
            f"tokenizer.checkpoint gives a {tok_grid}x{tok_grid} token grid at "
            f"tokenizer.img_size={tok_size}, but the ViT's patch grid is {grid[0]}x{grid[1]} "
            f"(model.img_size={m.img_size} / model.patch_size={m.patch_size})"
        )
    if int(meta["in_chans"]) != m.in_chans:
        raise ConfigError(
            f"tokenizer.checkpoint takes {meta['in_chans']}-channel images, "
            f"model.in_chans={m.in_chans}"
        )
    return tokenizer, meta, tok_size


def _beit_setup(cfg, base, mean, std, device, run_dir):
    """(task, training view, figure path, draw(epoch)) for BEiT; loads and checks the tokenizer."""
    m, d = cfg.model, cfg.data
    grid = (m.img_size // m.patch_size, m.img_size // m.patch_size)
    tokenizer, meta, tok_size = None, None, m.img_size
    if cfg.target.kind == "tokens":
        tokenizer, meta, tok_size = _checked_tokenizer(cfg, device)
    n = grid[0] * grid[1]
    sampler = mask_sampler(cfg)
    num_masked = sampler.num_masked
    transform = BEiTTransform(
        m.img_size, tok_size, mean, std, mask_fn=sampler, scale=d.crop_scale,
        hflip=d.hflip, color_jitter=cfg.tokenizer.color_jitter,
    )  # fmt: skip
    view = _training_view(cfg, base, transform, run_dir)
    if cfg.tokenizer.cache and tokenizer is not None:
        view = TokenCache(view, tokenizer, device=device)
    vocab = int(meta["vocab_size"]) if meta else None
    model = build_beit(cfg, vocab_size=vocab).to(device)
    task = BEiTPretrainTask(
        model, cfg, tokenizer=tokenizer, tokenizer_meta=meta, mean=mean, std=std
    )
    path = run_dir / "figures" / "beit_predictions.png"
    shown = AugmentedView(base, transform, seed=cfg.run.seed) if d.name == "shards" else view
    samples = [shown[i][0] for i in range(min(8, len(shown)))]

    def draw(epoch: int) -> None:
        if tokenizer is None or not hasattr(tokenizer, "decode"):
            return
        save_beit_figure(
            task, samples, path, mean=mean, std=std,
            title=f"BEiT predictions, epoch {epoch} ({num_masked} of {n} patches masked)",
        )  # fmt: skip

    return task, view, path, draw


def evaluate_knn(
    cfg: PretrainConfig, encoder, *, mean: list[float], std: list[float], device: torch.device
) -> dict[str, KnnResult]:
    """k-NN top-1 of the pretrained encoder, the same ViT at random init, and raw pixels."""
    k, m = cfg.eval.knn, cfg.model
    tf = EvalTransform(m.img_size, mean, std)
    views = []
    roots = {"train": k.train_root or cfg.data.root, "test": k.test_root or cfg.data.root}
    for split, limit in (("train", k.train_samples), ("test", k.test_samples)):
        data_cfg = dataclasses.replace(cfg.data, max_samples=limit, split=split, root=roots[split])
        if data_cfg.name == "shards":  # validated: k-NN folders given
            data_cfg = dataclasses.replace(data_cfg, name="folder")
        base = build_dataset(data_cfg, img_size=m.img_size, channels=m.in_chans, split=split)
        views.append(AugmentedView(base, tf, seed=cfg.run.seed))
    torch.manual_seed(cfg.run.seed)
    random_encoder = build_encoder(m).to(device)  # the same architecture, untrained
    opts = dict(
        k=k.k, temperature=k.temperature, pool=k.pool, batch_size=k.batch_size, device=device
    )
    return {
        "pretrained": knn_evaluate(encoder, *views, **opts),
        "random_init": knn_evaluate(random_encoder, *views, **opts),
        "raw_pixels": knn_evaluate_pixels(*views, k=k.k, temperature=k.temperature),
    }
