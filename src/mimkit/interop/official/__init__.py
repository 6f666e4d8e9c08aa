"""Read the official MAE and BEiT checkpoint files (``.pth``) safely; write them back.

Reading a file: :mod:`mimkit.interop.official.read` (the file format, and the weights-only,
allow-listed unpickling: ``argparse.Namespace`` is the one class beyond torch's defaults);
kind detection and architecture inference: :mod:`mimkit.interop.official.spec`; official ->
mimkit: :mod:`mimkit.interop.official.to_mimkit`; mimkit -> official:
:mod:`mimkit.interop.official.from_mimkit`. Their public names are re-exported here.

Layouts: each official kind, the keys it has besides the encoder's, and the mimkit layout it
converts to (``layout`` in the metadata):

- ``mae-encoder`` (``mae_pretrain_vit_*.pth``): ``norm``. -> ``timm-vit``, the same keys.
- ``mae-pretrain`` (``mae_visualize_vit_*.pth``, main_pretrain's ``checkpoint-*.pth``):
  ``norm, decoder_embed, mask_token, decoder_pos_embed, decoder_blocks.i, decoder_norm,
  decoder_pred``. -> ``official-mae``, the same keys (``MAE`` takes them through
  ``from_official_layout``).
- ``mae-classifier`` (main_finetune): ``fc_norm, head`` (global pool, no ``norm``) or ``norm,
  head`` (cls token). -> ``timm-classifier``, the same keys; ``pool`` "avg" / "cls".
- ``mae-linprobe`` (main_linprobe: ``head = Sequential(BatchNorm1d(affine=False, eps=1e-6),
  Linear)``): ``norm`` or ``fc_norm``, ``head.0.running_mean/running_var/num_batches_tracked``,
  ``head.1.weight/bias``. -> ``timm-vit-probe``: the encoder (and ``fc_norm``) plus
  ``probe.bn.running_mean/running_var``, ``probe.head.weight/bias`` (the key names of mimkit's
  ``probe.safetensors`` under ``probe.``; the batch count goes to the metadata), or with
  ``probe="fold"`` a ``timm-classifier``.
- ``beit-pretrain`` (modeling_pretrain): ``mask_token, rel_pos_bias.relative_position_bias_table,
  rel_pos_bias.relative_position_index, norm, lm_head``. -> ``official-beit``.
- ``beit-classifier`` (modeling_finetune, intermediate or final fine-tuning, any resolution):
  ``blocks.i.attn.relative_position_bias_table/_index``, ``fc_norm, head`` (mean pooling) or
  ``norm, head``. -> ``timm-classifier``.
- ``beit-encoder``: a BEiT encoder with neither ``lm_head`` nor ``head``. -> ``timm-beit``.

The ViT encoder (MAE, timm's ``VisionTransformer``): ``cls_token (1,1,D), pos_embed (1,1+N,D),
patch_embed.proj.{weight (D,C,p,p), bias}, blocks.i.{norm1, attn.qkv (3D,D)+bias, attn.proj,
norm2, mlp.fc1, mlp.fc2}``. The BEiT encoder (timm's ``Beit``): ``cls_token, patch_embed.proj,
[pos_embed], blocks.i.{gamma_1, gamma_2, norm1, attn.qkv.weight (no bias), attn.q_bias,
attn.v_bias, [attn.relative_position_bias_table ((2g-1)^2+3, H)], attn.proj, norm2, mlp.fc1,
mlp.fc2}``. The official BEiT registers ``relative_position_index`` ((g*g+1, g*g+1), int64) as a
persistent buffer, so its files hold one per table; mimkit (and timm) recompute it: on import each
is checked against the standard index and dropped, on export it is regenerated. Everything else
converts key for key, tensors unchanged (same objects, dtypes kept), so official -> mimkit ->
official is lossless. ``rel_pos_bias="per_layer"`` copies BEiT's shared pretraining table into
every block, as BEiT's fine-tuning code does (not reversible: the export then has per-block
tables). ``probe="fold"`` folds the linear probe's BatchNorm (eval statistics) into its linear
layer: ``W' = W / sqrt(var + eps)``, ``b' = b - W' mean``, an equivalent mimkit classifier.
"""

from mimkit.interop.official.from_mimkit import export_official, save_official, to_official
from mimkit.interop.official.read import (
    SAFE_GLOBALS,
    OfficialCheckpoint,
    UnsafeCheckpointError,
    read_official,
)
from mimkit.interop.official.spec import OFFICIAL_KINDS, OfficialKind
from mimkit.interop.official.to_mimkit import convert_official, import_official, load_official

__all__ = [
    "OFFICIAL_KINDS",
    "SAFE_GLOBALS",
    "OfficialCheckpoint",
    "OfficialKind",
    "UnsafeCheckpointError",
    "convert_official",
    "export_official",
    "import_official",
    "load_official",
    "read_official",
    "save_official",
    "to_official",
]
