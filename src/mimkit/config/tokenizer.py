"""The tokenizer-training config tree (`mimkit tokenizer train`): a discrete VAE for BEiT."""

from __future__ import annotations

from dataclasses import dataclass, field

from mimkit.config.core import check_choices, fail, positive
from mimkit.config.pretrain import (
    DataConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    resolve_batch_and_lr,
    validate_data,
    validate_optim,
    validate_run,
    validate_train,
)

__all__ = ["DVAEConfig", "DVAELossConfig", "TokenizerConfig", "TokenizerEvalConfig"]


@dataclass
class DVAEConfig:
    img_size: int = 28  # the tokenizer view; token grid = img_size / downsample
    in_chans: int = 1
    vocab_size: int = 8192
    hidden_dim: int = 64
    codebook_dim: int = 64
    downsample: int = 4  # a power of two; choose it so the token grid equals the ViT's patch grid
    num_resblocks: int = 1


@dataclass
class DVAELossConfig:
    kl_weight: float = 0.0  # weight of KL(q || uniform)
    temp_start: float = (
        1.0  # Gumbel-softmax temperature, annealed exponentially (DALL-E: 1 -> 1/16)
    )
    temp_end: float = 0.0625
    anneal_epochs: float = 1.0
    straight_through: bool = False  # hard one-hots forward, soft gradients backward


@dataclass
class TokenizerEvalConfig:
    samples: int = 2000  # held-out images (the test split for Fashion-MNIST) for per-epoch metrics


@dataclass
class TokenizerConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/tokenizer"))
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: DVAEConfig = field(default_factory=DVAEConfig)
    loss: DVAELossConfig = field(default_factory=DVAELossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(base_lr=1e-3, warmup_epochs=0.1))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2))
    eval: TokenizerEvalConfig = field(default_factory=TokenizerEvalConfig)

    def resolve(self) -> None:
        resolve_batch_and_lr(self.optim, self.train)

    def validate(self) -> None:
        check_choices(self)
        tk, loss = self.tokenizer, self.loss
        for key in ("img_size", "vocab_size", "hidden_dim", "codebook_dim", "downsample"):
            positive(f"tokenizer.{key}", getattr(tk, key))
        positive("tokenizer.in_chans", tk.in_chans)
        if tk.downsample < 2 or tk.downsample & (tk.downsample - 1):
            fail("tokenizer.downsample", tk.downsample, "a power of two >= 2")
        if tk.img_size % tk.downsample:
            fail(
                "tokenizer.img_size",
                tk.img_size,
                f"must be divisible by downsample={tk.downsample}",
            )
        if tk.vocab_size < 2:
            fail("tokenizer.vocab_size", tk.vocab_size, "at least 2 codes")
        if tk.num_resblocks < 0:
            fail("tokenizer.num_resblocks", tk.num_resblocks, "must be >= 0")
        if loss.kl_weight < 0:
            fail("loss.kl_weight", loss.kl_weight, "must be >= 0")
        positive("loss.temp_start", loss.temp_start)
        positive("loss.temp_end", loss.temp_end)
        positive("loss.anneal_epochs", loss.anneal_epochs)
        positive("eval.samples", self.eval.samples)
        validate_data(self.data, in_chans=tk.in_chans, chans_key="tokenizer.in_chans")
        validate_optim(self.optim, self.train)
        validate_train(self.train)
        validate_run(self.run)
