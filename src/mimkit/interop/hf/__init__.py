"""Convert mimkit checkpoints to and from Hugging Face ``transformers`` (ViT, ViTMAE, BEiT).

Pure tensor and key manipulation: nothing here imports ``transformers``, downloads anything or
unpickles anything. Supported pairs (mimkit state dict layout <-> HF class):

======================================  ==========================================================
mimkit                                  Hugging Face
======================================  ==========================================================
MAE encoder (timm ViT layout)           ``ViTModel`` (default) or ``ViTMAEModel``
full MAE (official layout)              ``ViTMAEForPreTraining``
ViT classifier, ``pool="cls"``          ``ViTForImageClassification``
BEiT encoder (timm Beit layout)         ``BeitModel``
full BEiT (official layout, lm_head)    ``BeitForMaskedImageModeling``
BEiT classifier, ``pool="avg"``/"cls"   ``BeitForImageClassification``
======================================  ==========================================================

A ViT classifier with ``pool="avg"`` has no HF counterpart (``ViTForImageClassification`` reads
the normed cls token) and is refused with a ValueError.

The key mapping (fused <-> split qkv, BEiT's absent key bias, ``gamma`` <-> ``lambda``, ...)
and the HF architecture table: :mod:`mimkit.interop.hf.layout`; the config conversion:
:mod:`mimkit.interop.hf.config`; state dicts: :mod:`mimkit.interop.hf.state`; folders and whole
checkpoints: :mod:`mimkit.interop.hf.folder`. Their public names are re-exported here.

Two HF key layouts exist. ``"hub"``: the names in HF checkpoint files (``encoder.layer.i.
attention.attention.query`` ...), which transformers 4.x uses in memory and 5.x still writes with
``save_pretrained`` and reads back; ``"v5"``: the in-memory names of transformers 5.x
(``layers.i.attention.q_proj`` ...), for ``model.load_state_dict``. :func:`to_hf` writes either;
:func:`from_hf` reads both (and the ``decoder.decoder_encoder.layer.i`` names that transformers 5
``save_pretrained`` writes for ViTMAE's decoder).

mimkit LayerNorms use eps 1e-6; exported configs say ``layer_norm_eps=1e-6`` (HF's default is
1e-12). Importing a config with another eps warns (mimkit keeps 1e-6; outputs differ by about
eps / variance, relatively). HF ``ViTModel``'s pooler (dense + tanh on the cls token) has no
mimkit counterpart: it is dropped on import (with a warning) and absent on export, so load an
exported ``ViTModel`` with ``from_pretrained(folder, add_pooling_layer=False)``.
"""

from mimkit.interop.hf.folder import export_to_hf, import_from_hf, load_hf_folder, save_hf_folder
from mimkit.interop.hf.layout import HF_ARCHITECTURES
from mimkit.interop.hf.state import from_hf, to_hf

__all__ = [
    "HF_ARCHITECTURES",
    "export_to_hf",
    "from_hf",
    "import_from_hf",
    "load_hf_folder",
    "save_hf_folder",
    "to_hf",
]
