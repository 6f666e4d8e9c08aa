import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import (
    AugmentedView,
    EvalTransform,
    FashionMNIST,
    ImageFolder,
    PretrainTransform,
    ResumableSampler,
    SyntheticImages,
    read_idx,
)


def write_idx(path, array, *, gz=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.fixture
def fmnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, n, gz in (("train", 20, True), ("t10k", 10, False)):
        suffix = ".gz" if gz else ""
        write_idx(
            tmp_path / f"{split}-images-idx3-ubyte{suffix}",
            rng.integers(0, 255, (n, 28, 28)),
            gz=gz,
        )
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, gz=gz)
    return tmp_path


def test_fashion_mnist_from_idx(fmnist_dir):
    train = FashionMNIST(fmnist_dir, "train")
    test = FashionMNIST(fmnist_dir, "test", max_samples=4)
    assert len(train) == 20 and len(test) == 4
    img, label = train[3]
    assert img.shape == (1, 28, 28) and img.dtype == torch.uint8 and label == 3


def test_idx_errors(tmp_path, fmnist_dir):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    trunc = tmp_path / "trunc"
    trunc.write_bytes((fmnist_dir / "t10k-images-idx3-ubyte").read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(trunc)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "empty", "train")


def test_image_folder_modes_and_labels(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGBA", (10, 12), (255, 0, 0, 128)).save(flat / "a.png")
    Image.new("P", (8, 8)).save(flat / "b.png")
    Image.fromarray(np.full((9, 9), 65535, dtype=np.uint16)).save(flat / "c.png")
    (flat / "notes.txt").write_text("not an image")
    ds = ImageFolder(flat, channels=3)
    assert len(ds) == 3 and all(ds[i][1] == -1 for i in range(3))
    assert ds[0][0].shape == (3, 12, 10)
    assert ImageFolder(flat, channels=1)[1][0].shape == (1, 8, 8)
    classes = tmp_path / "classes"
    for name in ("cat", "dog"):
        (classes / name).mkdir(parents=True)
        Image.new("L", (6, 6), 50).save(classes / name / "x.jpg")
    ds = ImageFolder(classes, channels=3)
    assert ds.classes == ("cat", "dog") and [ds[i][1] for i in range(2)] == [0, 1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty", channels=3)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageFolder(tmp_path / "missing", channels=3)


def test_per_sample_augmentation_is_a_function_of_seed_epoch_index():
    base = SyntheticImages(8, img_size=32, channels=3)
    tf = PretrainTransform(16, base.mean, base.std)
    view = AugmentedView(base, tf, seed=3)
    a = view[5]
    assert a[0].shape == (3, 16, 16)
    assert torch.equal(view[5][0], a[0])  # same (seed, epoch, index)
    view.set_epoch(1)
    assert not torch.equal(view[5][0], a[0])
    view.set_epoch(0)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(view[5][0], a[0])
    other = AugmentedView(base, tf, seed=4)
    assert not torch.equal(other[5][0], a[0])


def test_eval_transform_resizes_and_normalizes():
    img = torch.full((1, 20, 30), 255, dtype=torch.uint8)
    out = EvalTransform(16, [0.5], [0.5])(img)
    assert out.shape == (1, 16, 16) and torch.allclose(out, torch.ones_like(out), atol=1e-4)


def test_resumable_sampler():
    s = ResumableSampler(10, seed=1)
    s.set_epoch(2)
    full = list(s)
    assert sorted(full) == list(range(10))
    s.set_start(4)
    assert list(s) == full[4:] and len(s) == 6
    s.set_epoch(3)
    s.set_start(0)
    assert list(s) != full
    shards = [ResumableSampler(11, seed=1, rank=r, world_size=2) for r in range(2)]
    parts = [set(x) for x in shards]
    assert not parts[0] & parts[1] and len(parts[0]) == len(parts[1]) == 5


def test_beit_two_views_of_one_crop():
    from mimkit.data import BEiTTransform
    from mimkit.masking import MaskSampler

    img = (torch.rand(3, 40, 36, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    tf = BEiTTransform(
        32, 16, [0.5] * 3, [0.5] * 3, mask_fn=MaskSampler("blockwise", (4, 4), 6, min_block=2)
    )
    patch, tok, mask = tf(img, torch.Generator().manual_seed(3))
    assert patch.shape == (3, 32, 32) and tok.shape == (3, 16, 16) and mask.shape == (16,)
    assert int(mask.sum()) == 6 and tok.min() >= 0 and tok.max() <= 1
    again = tf(img, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip((patch, tok, mask), again, strict=True))
    # both views show the same crop: the patch view, de-normalized and downsized, is close to the
    # tokenizer view (Lanczos vs bicubic resampling differ only slightly)
    small = torch.nn.functional.interpolate((patch * 0.5 + 0.5)[None], size=16, mode="area")[0]
    assert (small - tok).abs().mean() < 0.05


def test_repeated_augmentation_sends_each_image_k_times_with_its_own_views():
    """DeiT's RASampler semantics: k copies of an image per epoch, on consecutive ranks, each
    augmented apart; the epoch keeps its length; rank shares stay disjoint."""
    from mimkit.data import AugmentedView, ResumableSampler, SyntheticImages

    n, k = 12, 3
    one = ResumableSampler(n, seed=0, repeats=k).indices()
    assert len(one) == n and [i % n for i in one[:k]] == [one[0] % n] * k
    assert len({i % n for i in one}) == n // k and len(set(one)) == n  # distinct copies
    ranks = [ResumableSampler(n, seed=0, repeats=k, rank=r, world_size=3).indices()
             for r in range(3)]  # fmt: skip
    assert sorted(i for r in ranks for i in r) == sorted(one)
    assert {ranks[r][0] % n for r in range(3)} == {one[0] % n}  # one image, three processes
    view = AugmentedView(SyntheticImages(n, img_size=16), lambda img, g: torch.rand(1, generator=g))
    a, la = view[one[0]]
    b, lb = view[one[1]]
    assert la == lb and not torch.equal(a, b)  # the same image, another augmentation
    assert ResumableSampler(n, seed=0).indices() == ResumableSampler(n, seed=0, repeats=1).indices()
    assert len(list(view)) == n  # iterating a view ends at its length (indexing does not)


def test_eval_transform_crop_pct_is_timms():
    """crop_pct 0.875 at 224: resize the short side to 256, center-crop 224 (timm's eval
    transform, the official MAE/BEiT evaluation); 1.0 keeps the whole image."""
    import timm.data
    from PIL import Image

    from mimkit.data import EvalTransform

    g = torch.Generator().manual_seed(0)
    img = (torch.rand(3, 300, 400, generator=g) * 255).to(torch.uint8)
    ours = EvalTransform(224, (0.5,) * 3, (0.5,) * 3, crop_pct=0.875)(img)
    ref_tf = timm.data.create_transform(224, crop_pct=0.875, interpolation="bicubic",
                                        mean=(0.5,) * 3, std=(0.5,) * 3)  # fmt: skip
    ref = ref_tf(Image.fromarray(img.permute(1, 2, 0).numpy()))
    assert ours.shape == ref.shape == (3, 224, 224)
    assert (ours - ref).abs().mean() < 0.02  # PIL's and torchvision's bicubic differ slightly
    whole = EvalTransform(224, (0.5,) * 3, (0.5,) * 3)(img)
    assert (whole - ours).abs().mean() > 0.05  # 1.0 sees more of the image
