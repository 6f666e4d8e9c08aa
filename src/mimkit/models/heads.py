"""Classification on top of a ViT encoder: the fine-tuning model (timm / MAE / BEiT layout).

Shapes: B batch, T = 1 + N tokens, D width, C classes.

With ``pool="avg"`` (BEiT's and MAE's global pool), the encoder's final norm is dropped and the
mean of the patch tokens goes through ``fc_norm`` then ``head``; with ``pool="cls"`` the normed
cls token goes to ``head``. :meth:`Classifier.timm_state_dict` is then key for key a timm
``VisionTransformer(global_pool=..., fc_norm=...)`` or ``Beit(use_fc_norm=...)`` state dict, which
is also the layout of the official MAE and BEiT fine-tuned checkpoints.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import trunc_normal_
from torch import nn

__all__ = ["Classifier"]

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class Classifier(nn.Module):
    """``encoder`` + (fc_norm) + linear ``head`` over ``num_classes``."""

    def __init__(
        self,
        encoder: nn.Module,
        *,
        num_classes: int,
        pool: str = "avg",
        head_init_std: float = 2e-5,
        head_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if pool not in ("avg", "cls"):
            raise ValueError(f"pool must be 'avg' or 'cls', got {pool!r}")
        self.encoder, self.pool, self.num_classes = encoder, pool, num_classes
        dim = encoder.embed_dim
        if pool == "avg":
            encoder.norm = nn.Identity()  # as timm/MAE/BEiT: fc_norm after pooling replaces it
            self.fc_norm = LayerNorm(dim)
        else:
            self.fc_norm = nn.Identity()
        self.head_drop = nn.Dropout(head_drop)
        self.head = nn.Linear(dim, num_classes)
        self.reset_head(head_init_std)

    def reset_head(self, std: float = 2e-5) -> None:
        """A fresh head (MAE: trunc_normal std 2e-5; BEiT: std 0.02 scaled by 0.001)."""
        trunc_normal_(self.head.weight, std=std)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(x)  # (B, T, D)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.encoder.pool(tokens, self.pool)  # (B, D)
        return self.head(self.head_drop(self.fc_norm(pooled)))  # (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ---- the flat (timm) layout of checkpoints ----

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder keys at the top level, then ``fc_norm.*`` and ``head.*``."""
        return {k.removeprefix("encoder."): v for k, v in self.state_dict().items()}

    def load_timm_state_dict(self, state: dict[str, torch.Tensor], *, strict: bool = True):
        heads = ("fc_norm.", "head.", "head_drop.")
        keyed = {(k if k.startswith(heads) else f"encoder.{k}"): v for k, v in state.items()}
        return self.load_state_dict(keyed, strict=strict)

    # ---- what optimizers need ----

    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def is_head(self, name: str) -> bool:
        """Whether parameter ``name`` belongs to the task head (everything but the encoder)."""
        return not name.startswith("encoder.")

    def layer_id(self, name: str) -> int:
        """Encoder parameters by the encoder's rule; fc_norm and head with the top layer."""
        if name.startswith("encoder."):
            return self.encoder.layer_id(name.removeprefix("encoder."))
        return self.num_layers - 1
