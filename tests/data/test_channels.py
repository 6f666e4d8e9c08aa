"""Any number of channels: .npy arrays and multi-band TIFFs, per-channel statistics, clear
errors where an operation is defined for grayscale and RGB only."""

import numpy as np
import pytest
import tifffile
import torch

from mimkit.config import ConfigError, load_config
from mimkit.data.datasets import BadImageError, ImageFolder, load_image
from mimkit.tasks.pretrain import run_pretrain
from mimkit.weights import read_metadata
from tests.conftest import DEMO, tiny_overrides


def test_arrays_and_tiffs_give_every_band(tmp_path):
    rng = np.random.default_rng(0)
    chw = rng.integers(0, 65535, (4, 8, 6), dtype=np.uint16)
    np.save(tmp_path / "a.npy", chw)
    img = load_image(tmp_path / "a.npy", channels=4)
    assert img.dtype == torch.float32 and img.shape == (4, 8, 6)
    assert torch.allclose(img, torch.from_numpy(chw.astype(np.float32) / 65535))
    np.save(tmp_path / "hwc.npy", np.moveaxis(chw, 0, -1))
    assert torch.equal(load_image(tmp_path / "hwc.npy", channels=4), img)
    u8 = rng.integers(0, 255, (13, 5, 5), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "s2.tif", u8)  # 13 bands, as Sentinel-2
    assert torch.equal(load_image(tmp_path / "s2.tif", channels=13), torch.from_numpy(u8))
    with open(tmp_path / "a.npy", "rb") as f:  # a file object (a shard member) says its suffix
        assert torch.equal(load_image(f, channels=4, suffix="npy"), img)
    with pytest.raises(BadImageError, match="no 3 bands"):
        load_image(tmp_path / "a.npy", channels=3)
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        load_image(tmp_path / "obj.npy", channels=1)  # never unpickled
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    with pytest.raises(BadImageError, match=r"4-channel images are read from \.npy"):
        load_image(tmp_path / "x.png", channels=4)


def _folder(root, channels=4, n=8):
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            np.save(root / c / f"{i}.npy", rng.random((channels, 16, 16), dtype=np.float32))
    return root


def test_a_four_band_folder_pretrains_and_records_its_statistics(tmp_path):
    root = _folder(tmp_path / "data")
    ds = ImageFolder(root, channels=4)
    assert len(ds) == 16 and ds.mean == (0.5,) * 4 and ds[0][0].shape == (4, 16, 16)
    stats = ["data.mean=[0.4,0.5,0.5,0.6]", "data.std=[0.3,0.3,0.3,0.3]"]
    over = tiny_overrides(tmp_path / "run", **{"data.name": "folder", "data.root": str(root),
                                              "model.in_chans": 4, "train.epochs": 1})  # fmt: skip
    res = run_pretrain(load_config(DEMO, [*over, *stats]))
    assert res.train.step == 2 and np.isfinite(res.train.loss)
    meta = read_metadata(res.encoder_path)
    assert meta["in_chans"] == 4 and meta["mean"] == [0.4, 0.5, 0.5, 0.6]
    with pytest.raises(ConfigError, match=r"data\.mean.*one value per channel"):
        load_config(DEMO, [*over, "data.mean=[0.5,0.5,0.5]"])
    # exported to timm and Hugging Face with its four bands and their statistics
    import timm
    from transformers import ViTModel

    from mimkit.cli import main

    assert main(["convert", str(res.encoder_path), str(tmp_path / "timm"), "--to", "timm"]) == 0
    assert main(["convert", str(res.encoder_path), str(tmp_path / "hf"), "--to", "hf"]) == 0
    vit = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    assert vit.patch_embed.proj.in_channels == 4
    assert list(vit.pretrained_cfg["mean"]) == [0.4, 0.5, 0.5, 0.6]
    hf = ViTModel.from_pretrained(tmp_path / "hf")
    x = torch.randn(1, 4, 16, 16)
    assert hf.config.num_channels == 4 and hf(pixel_values=x).last_hidden_state.shape == (1, 17, 32)


def test_grayscale_and_rgb_only_operations_say_so(tmp_path):
    from mimkit.config.downstream import FinetuneConfig

    root = _folder(tmp_path / "data", n=1)
    ft = ["data.name=folder", f"data.root={root}", f"data.eval_root={root}", "model.init=null",
          "model.arch=vit_tiny",
          "model.method=mae", "model.img_size=16", "model.patch_size=4", "model.in_chans=4",
          "data.mean=[0.5,0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5,0.5]"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"aug\.rand_augment=.*null for 4 channels"):
        load_config(DEMO.parents[1] / "finetune" / "fmnist_vit_tiny.yaml",
                    [*ft, "aug.rand_augment=rand-m9-mstd0.5"], schema=FinetuneConfig)  # fmt: skip
    from mimkit.models.tokenizer_io import DalleTokenizer

    with pytest.raises(ConfigError, match="grayscale or RGB images, not 4 channels"):
        DalleTokenizer.encode(None, torch.zeros(1, 4, 8, 8))
