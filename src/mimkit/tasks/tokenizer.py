"""``mimkit tokenizer train``: a discrete VAE whose token grid is the ViT patch grid (BEiT 2.2).

Writes the run directory like every training command, plus ``tokenizer.safetensors`` (weights and
provenance) and ``figures/tokenizer_reconstruction.png``. Per epoch it logs the reconstruction
through hard tokens (MSE, PSNR) and codebook usage (perplexity, fraction of codes used) on
held-out images.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mimkit import __version__
from mimkit.config import TokenizerConfig
from mimkit.data import SKIP_REPORT, AugmentedView, EvalTransform, PretrainTransform, build_dataset
from mimkit.engine import checkpoint as ckpt
from mimkit.engine.distributed import is_main
from mimkit.engine.evaluation import Evaluation
from mimkit.engine.rundir import prepare_run
from mimkit.engine.task import StepOutput, TaskHooks
from mimkit.engine.trainer import Trainer, TrainResult
from mimkit.models.tokenizer import (
    DiscreteVAE,
    codebook_usage,
    dvae_loss,
    gumbel_temperature,
    psnr,
)
from mimkit.viz import save_tokenizer_figure
from mimkit.weights import Provenance

__all__ = ["TokenizerResult", "TokenizerTask", "build_dvae", "evaluate_tokenizer", "run_tokenizer"]

TOKENIZER_FILE = "tokenizer.safetensors"


def build_dvae(cfg: TokenizerConfig) -> DiscreteVAE:
    t = cfg.tokenizer
    return DiscreteVAE(
        in_chans=t.in_chans,
        vocab_size=t.vocab_size,
        hidden_dim=t.hidden_dim,
        codebook_dim=t.codebook_dim,
        downsample=t.downsample,
        num_resblocks=t.num_resblocks,
    )


def dvae_metadata(cfg: TokenizerConfig) -> dict[str, Any]:
    t = cfg.tokenizer
    grid = [t.img_size // t.downsample] * 2
    extra = {"input_range": "[0, 1]", **dataclasses.asdict(t), "grid": grid}
    return Provenance(kind="dvae", mimkit_version=__version__, extra=extra).to_metadata()


class TokenizerTask(TaskHooks):
    """The trainer's task: Gumbel-softmax dVAE, reconstruction + KL to the uniform prior."""

    name = "tokenizer"

    def __init__(self, model: DiscreteVAE, cfg: TokenizerConfig) -> None:
        self.model, self.cfg = model, cfg
        self.device = next(model.parameters()).device
        self.temperature = cfg.loss.temp_start

    def on_step(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        anneal = max(1, round(self.cfg.loss.anneal_epochs * steps_per_epoch))
        self.temperature = gumbel_temperature(
            step, start=self.cfg.loss.temp_start, end=self.cfg.loss.temp_end, anneal_steps=anneal
        )

    def step(self, batch: Any) -> StepOutput:
        imgs = batch[0].to(self.device, non_blocking=True)  # (B, C, H, W) in [0, 1]
        out = self.model(imgs, temperature=self.temperature, hard=self.cfg.loss.straight_through)
        loss = dvae_loss(out.recon, imgs, out.logits, kl_weight=self.cfg.loss.kl_weight)
        logs = {"recon_mse": loss.recon.detach(), "kl": loss.kl.detach()}
        logs["temperature"] = torch.tensor(self.temperature)
        return StepOutput(loss.total, logs)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)

    def metadata(self) -> dict[str, Any]:
        return dvae_metadata(self.cfg)


@torch.no_grad()
def evaluate_tokenizer(model: DiscreteVAE, dataset, *, device, batch_size: int = 256) -> dict:
    """Reconstruction through hard tokens (MSE, PSNR) and codebook usage on ``dataset``."""
    was_training = model.training
    model.eval()
    # per-image means, summed over batches (psnr() averages per-image PSNR within a batch)
    sums = {"recon_mse": 0.0, "psnr": 0.0, "psnr_floor": 0.0}
    ids_all = []
    for imgs, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        imgs = imgs.to(device)
        ids = model.encode(imgs)  # (B, h, w)
        recon = model.decode(ids)
        flat = imgs.mean(dim=(1, 2, 3), keepdim=True).expand_as(imgs)  # the floor: constant images
        n = len(imgs)
        sums["recon_mse"] += float((recon - imgs).pow(2).mean()) * n
        sums["psnr"] += float(psnr(recon, imgs)) * n
        sums["psnr_floor"] += float(psnr(flat, imgs)) * n
        ids_all.append(ids.cpu())
    model.train(was_training)
    ids = torch.cat(ids_all)
    usage = codebook_usage(ids, model.vocab_size)
    return {
        **{k: v / len(ids) for k, v in sums.items()},
        "perplexity": float(usage.perplexity),
        "codes_used": float(usage.fraction_used),
        "num_images": len(ids),
    }


COLLAPSED_PERPLEXITY = 2.0  # a codebook whose usage perplexity is below this has collapsed


@dataclasses.dataclass
class TokenizerResult:
    run_dir: Path
    train: TrainResult
    tokenizer_path: Path | None
    metrics: dict


def run_tokenizer(cfg: TokenizerConfig, *, resume: bool = False) -> TokenizerResult:
    """Train a dVAE tokenizer as ``cfg`` says; write everything to ``cfg.run.dir``."""
    run_dir, device = prepare_run(cfg, resume=resume, ddp_only="mimkit tokenizer train")
    t, d = cfg.tokenizer, cfg.data
    base = build_dataset(d, img_size=t.img_size, channels=t.in_chans, report=run_dir / SKIP_REPORT)
    zeros, ones = [0.0] * t.in_chans, [1.0] * t.in_chans  # the tokenizer sees [0, 1] pixels
    view = AugmentedView(
        base, PretrainTransform(t.img_size, zeros, ones, scale=d.crop_scale, hflip=d.hflip),
        seed=cfg.run.seed,
    )  # fmt: skip
    held_split = "test" if d.name == "fashion_mnist" else d.split
    held_cfg = dataclasses.replace(d, split=held_split, max_samples=cfg.eval.samples)
    held = AugmentedView(
        build_dataset(held_cfg, img_size=t.img_size, channels=t.in_chans, split=held_split),
        EvalTransform(t.img_size, zeros, ones),
    )
    model = build_dvae(cfg).to(device)
    task = TokenizerTask(model, cfg)
    fig_imgs = torch.stack([held[i][0] for i in range(min(8, len(held)))]).to(device)
    fig_path = run_dir / "figures" / "tokenizer_reconstruction.png"

    # held-out reconstruction and codebook usage after every epoch, logged only
    def evaluate(m: DiscreteVAE) -> dict:
        record = evaluate_tokenizer(m, held, device=device)
        if record["perplexity"] < COLLAPSED_PERPLEXITY:  # one or two codes for every image
            print(f"mimkit: warning: the codebook has collapsed (perplexity "
                  f"{record['perplexity']:.2f} of {m.vocab_size} codes): lower the lr or raise "
                  "loss.kl_weight", file=sys.stderr, flush=True)  # fmt: skip
        return record

    held_out = Evaluation(evaluate=evaluate, metric=None)

    def on_epoch_end(epoch: int, final: bool) -> None:
        if final or epoch % cfg.train.figure_every_epochs == 0:
            save_tokenizer_figure(model, fig_imgs, fig_path, title=f"dVAE, epoch {epoch}")

    trainer = Trainer(
        task, view, optim=cfg.optim, train=cfg.train, run_dir=run_dir, device=device,
        seed=cfg.run.seed, num_workers=d.num_workers, evaluation=held_out,
        on_epoch_end=on_epoch_end,
    )  # fmt: skip
    if resume:
        trainer.resume()
    result = trainer.fit()
    path, metrics = None, {}
    if is_main():
        metrics = evaluate_tokenizer(model, held, device=device)
        save_tokenizer_figure(model, fig_imgs, fig_path, title=f"dVAE, step {result.step}")
        path = run_dir / TOKENIZER_FILE
        ckpt.save_weights(path, model.state_dict(), {**task.metadata(), "step": result.step})
        (run_dir / "eval.json").write_text(json.dumps({"tokenizer": metrics}, indent=2) + "\n")
    return TokenizerResult(run_dir, result, path, metrics)
