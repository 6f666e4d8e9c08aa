"""Dense data: Fashion-MNIST mosaics, ADE20K-style folders, COCO json, joint transforms."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data.dense import (
    ADE20K_NUM_CLASSES,
    MOSAIC_CLASSES,
    CocoDetection,
    FashionMosaic,
    SegmentationFolder,
)
from mimkit.data.dense_transforms import (
    DenseView,
    DetectTransform,
    SegmentTransform,
    detection_collate,
    segmentation_collate,
)
from mimkit.data.views import sample_seed

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def blob_items(n, rng):
    """(n, 28, 28) uint8: faint noise (below the 0.1 threshold) plus a bright ellipse."""
    yy, xx = np.mgrid[:28, :28]
    items = rng.integers(0, 20, (n, 28, 28))
    for k in range(n):
        cy, cx = rng.integers(11, 17, size=2)
        ry, rx = rng.integers(4, 12, size=2)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        items[k][blob] = rng.integers(120, 256)
    return items


def write_fmnist(root, *, blank=False):
    """Train labels 0..4, test labels 5..9: the split a canvas came from shows in its labels."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for stem, n, offset in (("train", 50, 0), ("t10k", 30, 5)):
        items = np.zeros((n, 28, 28)) if blank else blob_items(n, rng)
        write_idx(root / f"{stem}-images-idx3-ubyte", items)
        write_idx(root / f"{stem}-labels-idx1-ubyte", offset + np.arange(n) % 5)
    return root


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory):
    return write_fmnist(tmp_path_factory.mktemp("fmnist"))


def mask_box(mask):
    """Tight xyxy box (x2/y2 exclusive) of a 2-D 0/1 mask."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def assert_same(a, b):
    (ia, ta), (ib, tb) = a, b
    assert torch.equal(ia, ib)
    for key in ("semantic", "boxes", "labels", "masks"):
        assert torch.equal(ta[key], tb[key]), key


# --- FashionMosaic ---------------------------------------------------------------------------


def test_mosaic_is_a_pure_function_of_seed_split_index(fmnist_root):
    ds = FashionMosaic(fmnist_root, "train", size=20, seed=3)
    first = ds[7]
    _ = ds[2], ds[11]  # call order must not matter
    assert_same(first, ds[7])
    assert_same(first, FashionMosaic(fmnist_root, "train", size=20, seed=3)[7])
    other = FashionMosaic(fmnist_root, "train", size=20, seed=4)
    assert any(not torch.equal(ds[i][0], other[i][0]) for i in range(5))
    images = [ds[i][0] for i in range(len(ds))]
    assert all(not torch.equal(a, b) for k, a in enumerate(images) for b in images[k + 1 :])
    # train canvases draw from the train split (labels 1..5), test ones from the test split
    test = FashionMosaic(fmnist_root, "test", size=20, seed=3)
    train_labels = torch.cat([ds[i][1]["labels"] for i in range(20)])
    test_labels = torch.cat([test[i][1]["labels"] for i in range(20)])
    assert set(train_labels.tolist()) <= {1, 2, 3, 4, 5}
    assert set(test_labels.tolist()) <= {6, 7, 8, 9, 10}
    assert len(set(train_labels.tolist())) > 1


def test_mosaic_masks_boxes_and_semantic_agree(fmnist_root):
    ds = FashionMosaic(fmnist_root, "train", size=30, canvas=56, items=(1, 4), seed=1)
    assert ds.num_classes == 11 and ds.classes == MOSAIC_CLASSES and len(ds) == 30
    assert ds.channels == 1 and ds.ignore_index == 255 and len(ds.mean) == len(ds.std) == 1
    counts = []
    for i in range(len(ds)):
        image, t = ds[i]
        k = len(t["labels"])
        counts.append(k)
        assert image.shape == (1, 56, 56) and image.dtype == torch.uint8
        assert t["semantic"].shape == (56, 56) and t["semantic"].dtype == torch.int64
        assert t["boxes"].shape == (k, 4) and t["boxes"].dtype == torch.float32
        assert t["labels"].dtype == torch.int64 and t["masks"].shape == (k, 56, 56)
        assert t["masks"].dtype == torch.uint8 and t["image_id"] == i
        assert ds.items[0] <= k <= ds.items[1]  # the requested items per canvas (1..4)
        assert ((t["labels"] >= 1) & (t["labels"] <= 10)).all()
        assert (t["boxes"] >= 0).all() and (t["boxes"] <= 56).all()
        assert (t["masks"].sum(0) <= 1).all()  # instances don't overlap
        covered = t["masks"].sum(0).bool()
        assert (t["semantic"][~covered] == 0).all()
        for box, label, mask in zip(t["boxes"], t["labels"], t["masks"], strict=True):
            assert mask_box(mask) == box.tolist()
            assert (t["semantic"][mask.bool()] == label).all()
        # the foreground is exactly the pixels above the threshold
        assert torch.equal(image[0] > 0.1 * 255, covered)
    assert len(set(counts)) > 1


def test_mosaic_blank_items_are_skipped_and_errors(tmp_path, fmnist_root):
    blank = FashionMosaic(write_fmnist(tmp_path / "blank", blank=True), "train", size=3)
    image, t = blank[0]
    assert image.sum() == 0 and (t["semantic"] == 0).all()
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    assert t["masks"].shape == (0, 56, 56)
    with pytest.raises(ValueError, match="split"):
        FashionMosaic(fmnist_root, "val")
    with pytest.raises(ValueError, match="items"):
        FashionMosaic(fmnist_root, items=(0, 2))
    with pytest.raises(IndexError):
        blank[3]


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="real Fashion-MNIST not installed")
def test_mosaic_from_real_fashion_mnist():
    ds = FashionMosaic(REAL_FMNIST, "test", size=8, source_max_samples=200)
    for i in range(len(ds)):
        _, t = ds[i]
        assert len(t["labels"]) >= 1
        for box, mask in zip(t["boxes"], t["masks"], strict=True):
            assert mask_box(mask) == box.tolist()


# --- SegmentationFolder ----------------------------------------------------------------------


@pytest.fixture
def ade_root(tmp_path):
    rng = np.random.default_rng(0)
    for sub in ("images/training", "annotations/training"):
        (tmp_path / sub).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(
        tmp_path / "images/training/a.png"
    )
    Image.fromarray(rng.integers(0, 256, (10, 8, 3), dtype=np.uint8)).save(
        tmp_path / "images/training/b.jpg"
    )
    label_a = rng.choice(np.array([0, 1, 2, 5], dtype=np.uint8), size=(12, 16))
    Image.fromarray(label_a).save(tmp_path / "annotations/training/a.png")  # mode L
    label_b = rng.choice(np.array([0, 3, 255], dtype=np.uint8), size=(10, 8))
    pal = Image.frombytes("P", (8, 10), label_b.tobytes())  # palette PNG, as ADE20K ships
    pal.putpalette(list(range(256)) * 3)
    pal.save(tmp_path / "annotations/training/b.png")
    return tmp_path, torch.from_numpy(label_a).long(), torch.from_numpy(label_b).long()


def test_segmentation_folder_reduce_zero_label(ade_root):
    root, label_a, label_b = ade_root
    ds = SegmentationFolder(root)
    assert len(ds) == 2 and ds.num_classes == ADE20K_NUM_CLASSES and len(ds.classes) == 150
    assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)
    image, t = ds[0]  # a.png sorts first
    assert image.shape == (3, 12, 16) and image.dtype == torch.uint8 and t["image_id"] == 0
    sem = t["semantic"]
    assert sem.dtype == torch.int64 and sem.shape == (12, 16)
    assert (sem[label_a == 0] == 255).all()
    assert torch.equal(sem[label_a > 0], label_a[label_a > 0] - 1)
    sem_b = ds[1][1]["semantic"]
    assert ds[1][0].shape == (3, 10, 8)
    assert set(sem_b.unique().tolist()) == {2, 255}
    assert (sem_b[label_b == 3] == 2).all()


def test_segmentation_folder_keeps_labels_and_reads_classes(ade_root):
    root, label_a, label_b = ade_root
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationFolder(root, reduce_zero_label=False)
    ds = SegmentationFolder(root, reduce_zero_label=False, num_classes=6, channels=1)
    assert ds.classes == ("0", "1", "2", "3", "4", "5")
    image, t = ds[0]
    assert image.shape == (1, 12, 16) and ds.mean == (0.5,)
    assert torch.equal(t["semantic"], label_a)
    assert torch.equal(ds[1][1]["semantic"], label_b)  # 255 stays the ignore value
    (root / "classes.txt").write_text("wall\nfloor\n\nsky\nroad\ncar\n")
    named = SegmentationFolder(root)
    assert named.classes == ("wall", "floor", "sky", "road", "car") and named.num_classes == 5
    with pytest.raises(ValueError, match=r"classes\.txt"):
        SegmentationFolder(root, num_classes=7)
    assert len(SegmentationFolder(root, max_samples=1)) == 1


def test_segmentation_folder_errors(ade_root, tmp_path):
    root, _, _ = ade_root
    Image.new("RGB", (4, 4)).save(root / "images/training/c.jpeg")
    with pytest.raises(ValueError, match=r"c\.jpeg.*annotation.*c\.png"):
        SegmentationFolder(root)
    with pytest.raises(ValueError, match="validation"):
        SegmentationFolder(root, "validation")
    (tmp_path / "empty/images/training").mkdir(parents=True)
    (tmp_path / "empty/annotations/training").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        SegmentationFolder(tmp_path / "empty")


def test_segmentation_folder_names_an_undecodable_image_or_label(ade_root):
    """Images go through mimkit's decoder (raster formats only, EXIF orientation applied as
    OpenCV does for mmseg); label maps must be PNG. A bad file is named, not a Pillow trace."""
    from mimkit.data import BadImageError

    root, _, _ = ade_root
    ds = SegmentationFolder(root)
    (root / "images/training/a.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n")  # not a raster
    with pytest.raises(BadImageError, match=r"a\.png: cannot decode"):
        ds[0]
    jpeg = root / "annotations/training/b.png"
    Image.new("L", (8, 10)).save(jpeg, format="JPEG")  # a JPEG under a .png name
    with pytest.raises(BadImageError, match=r"b\.png: cannot decode the label PNG"):
        ds[1]
    rotated = Image.fromarray(np.zeros((10, 8, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    rotated.save(root / "images/training/b.jpg", exif=exif)
    Image.fromarray(np.zeros((10, 8), np.uint8)).save(jpeg)
    with pytest.raises(ValueError, match=r"label size \(10, 8\) != image size \(8, 10\)"):
        ds[1]  # oriented for display, the image no longer fits its label map: said


# --- CocoDetection ---------------------------------------------------------------------------


def uncompressed_rle(mask):
    """COCO's uncompressed RLE: run lengths over the column-major flattening, zeros first."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


@pytest.fixture
def coco_root(tmp_path):
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"one.png": (30, 40), "two.jpg": (20, 20), "three.png": (16, 16)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    square = np.zeros((30, 40), dtype=np.uint8)
    square[10:20, 20:30] = 1  # 100 px, box [20, 10, 30, 20]
    compressed = mask_utils.encode(np.asfortranarray(square))
    compressed["counts"] = compressed["counts"].decode("ascii")  # as COCO json stores it
    crowd = np.zeros((30, 40), dtype=np.uint8)
    crowd[0:5, 30:40] = 1  # 50 px
    data = {
        "images": [
            {"id": 12, "file_name": "two.jpg", "height": 20, "width": 20},
            {"id": 11, "file_name": "one.png", "height": 30, "width": 40},
            {"id": 13, "file_name": "three.png", "height": 16, "width": 16},
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 7, "bbox": [2, 3, 10, 5], "iscrowd": 0,
             "segmentation": [[2, 3, 12, 3, 12, 8, 2, 8]]},
            {"id": 2, "image_id": 11, "category_id": 3, "bbox": [20, 10, 10, 10], "iscrowd": 0,
             "segmentation": compressed},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [30, 0, 10, 5], "iscrowd": 1,
             "segmentation": uncompressed_rle(crowd)},
            {"id": 4, "image_id": 12, "category_id": 7, "bbox": [5, 5, 1, 4], "iscrowd": 0,
             "segmentation": [[5, 5, 6, 5, 6, 9, 5, 9]]},
            {"id": 5, "image_id": 12, "category_id": 3, "bbox": [1, 2, 6, 7], "iscrowd": 0,
             "segmentation": [[1, 2, 7, 2, 7, 9, 1, 9]]},
        ],
    }  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path, data


def test_coco_detection_boxes_labels_masks(coco_root):
    root, _ = coco_root
    ds = CocoDetection(root, root / "ann.json", masks=True)
    assert len(ds) == 3 and ds.classes == ("background", "dog", "cat") and ds.num_classes == 3
    assert ds.cat_ids == [-1, 3, 7]
    image, t = ds[0]  # COCO id 11, the images are sorted by id
    assert image.shape == (3, 30, 40) and image.dtype == torch.uint8 and t["image_id"] == 11
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    assert t["boxes"].tolist() == [[2, 3, 12, 8], [20, 10, 30, 20]]  # crowd dropped
    assert t["labels"].tolist() == [2, 1]
    assert t["masks"].shape == (2, 30, 40) and t["masks"].dtype == torch.uint8
    assert t["masks"].sum((1, 2)).tolist() == [50, 100]  # polygon, compressed RLE
    for box, mask in zip(t["boxes"], t["masks"], strict=True):
        assert mask_box(mask) == box.tolist()
    _, t = ds[1]  # id 12: the 1-px-wide box is dropped
    assert t["image_id"] == 12 and t["boxes"].tolist() == [[1, 2, 7, 9]]
    assert t["labels"].tolist() == [1] and t["masks"].sum().item() == 42
    _, t = ds[2]  # id 13: no annotations
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    assert t["masks"].shape == (0, 16, 16)


def test_coco_detection_crowd_and_no_masks(coco_root):
    root, _ = coco_root
    _, t = CocoDetection(root, root / "ann.json", masks=True, skip_crowd=False)[0]
    assert t["boxes"].tolist()[2] == [30, 0, 40, 5] and t["labels"].tolist() == [2, 1, 1]
    assert t["masks"][2].sum().item() == 50  # uncompressed RLE
    assert mask_box(t["masks"][2]) == [30, 0, 40, 5]
    ds = CocoDetection(root, root / "ann.json", channels=1, max_samples=2)
    image, t = ds[0]
    assert len(ds) == 2 and image.shape == (1, 30, 40) and "masks" not in t
    assert ds.mean == (0.5,)


def test_coco_detection_errors(coco_root):
    root, data = coco_root
    with pytest.raises(ValueError, match="not found"):
        CocoDetection(root, root / "missing.json")
    (root / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoDetection(root, root / "bad.json")
    (root / "nococo.json").write_text(json.dumps({"info": {}}))
    with pytest.raises(ValueError, match="'images'"):
        CocoDetection(root, root / "nococo.json")
    data = json.loads(json.dumps(data))
    data["images"][0]["file_name"] = "gone.png"
    (root / "gone.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"gone\.png"):
        CocoDetection(root, root / "gone.json")
    data["images"][0]["file_name"] = "two.jpg"
    data["annotations"][4]["segmentation"] = 5
    (root / "seg.json").write_text(json.dumps(data))
    ds = CocoDetection(root, root / "seg.json", masks=True)
    with pytest.raises(ValueError, match=r"annotation 5.*polygons or an RLE"):
        ds[1]


# --- SegmentTransform ------------------------------------------------------------------------

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def seg_sample(h=20, w=30, channels=3, seed=0):
    g = gen(seed)
    image = torch.randint(0, 256, (channels, h, w), generator=g, dtype=torch.uint8)
    values = torch.tensor([0, 1, 2, 7, 255])
    semantic = values[torch.randint(0, 5, (h, w), generator=g)]
    return image, {"semantic": semantic, "image_id": 4}


def test_segment_transform_train_shapes_values_determinism():
    image, target = seg_sample()
    t = SegmentTransform(size=16, mean=MEAN, std=STD, train=True)
    x, out = t(image, target, gen(0))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert out["semantic"].shape == (16, 16) and out["semantic"].dtype == torch.int64
    assert set(out["semantic"].unique().tolist()) <= {0, 1, 2, 7, 255}
    assert set(out) == {"semantic", "image_id"} and out["image_id"] == 4
    x2, out2 = t(image, target, gen(0))
    assert torch.equal(x, x2) and torch.equal(out["semantic"], out2["semantic"])
    outs = {t(image, target, gen(s))[1]["semantic"].sum().item() for s in range(8)}
    assert len(outs) > 1


def test_segment_transform_pads_with_ignore_and_resizes_nearest():
    image, target = seg_sample(8, 12, channels=3)
    for flip in (0.0, 1.0):  # the padding stays at the bottom/right either way
        t = SegmentTransform(size=32, mean=MEAN, std=STD, train=True, scale=(0.5, 0.5), hflip=flip)
        x, out = t(image, target, gen(1))
        # 0.5 * min(32 / 8, 4 * 32 / 12) = 2 (the short side becomes 0.5 * 32): 8x12 -> 16x24
        assert (out["semantic"][16:] == 255).all() and (out["semantic"][:, 24:] == 255).all()
        assert (out["semantic"][:16, :24] != 255).any()
        # the normalized image is padded with 0 (the mean), as sliding-window inference pads
        assert (x[:, 16:] == 0).all() and (x[:, :, 24:] == 0).all()
    # an exact 2x upscale: nearest repeats every label twice along both axes
    image, target = seg_sample(8, 8)
    sem = target["semantic"]
    up = sem.repeat_interleave(2, 0).repeat_interleave(2, 1)
    t = SegmentTransform(size=16, mean=MEAN, std=STD, train=True, scale=(1, 1), hflip=0.0)
    assert torch.equal(t(image, target, gen(0))[1]["semantic"], up)
    t = SegmentTransform(size=16, mean=MEAN, std=STD, train=True, scale=(1, 1), hflip=1.0)
    assert torch.equal(t(image, target, gen(0))[1]["semantic"], up.flip(-1))


def test_nearest_resampling_takes_pixel_centres():
    # a 3x downscale keeps the centre pixel of every 3x3 block (nearest-exact), the pixel
    # whose centre coincides with the output pixel's, as the bilinear image is sampled
    image, target = seg_sample(12, 12)
    t = SegmentTransform(size=4, mean=MEAN, std=STD, train=True, scale=(1, 1), hflip=0.0)
    assert torch.equal(t(image, target, gen(0))[1]["semantic"], target["semantic"][1::3, 1::3])
    masks = (torch.rand(2, 12, 12, generator=gen(1)) > 0.5).to(torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 12.0, 12.0], [3.0, 3.0, 9.0, 9.0]])
    det = {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks, "image_id": 0}
    _, out = DetectTransform(size=4, train=False)(image, det, None)
    assert torch.equal(out["masks"], masks[:, 1::3, 1::3])
    assert torch.allclose(out["boxes"], boxes / 3)


def test_segment_transform_eval_keeps_label_resolution():
    image, target = seg_sample(20, 30)
    x, out = SegmentTransform(size=16, mean=MEAN, std=STD, train=False)(image, target, None)
    expected = (image.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(
        3, 1, 1
    )
    assert torch.allclose(x, expected) and torch.equal(out["semantic"], target["semantic"])
    t = SegmentTransform(size=16, mean=MEAN, std=STD, train=False, eval_short_side=10)
    x, out = t(image, target, gen(0))
    assert x.shape == (3, 10, 15) and torch.equal(out["semantic"], target["semantic"])


# --- DetectTransform -------------------------------------------------------------------------


def test_detect_transform_scales_boxes_and_pads():
    image = torch.randint(0, 256, (3, 40, 20), generator=gen(0), dtype=torch.uint8)
    masks = torch.zeros(1, 40, 20, dtype=torch.uint8)
    masks[0, 4:20, 2:10] = 1
    target = {"boxes": torch.tensor([[2.0, 4.0, 10.0, 20.0]]), "labels": torch.tensor([3]),
              "masks": masks, "image_id": 9}  # fmt: skip
    x, out = DetectTransform(size=80, train=False)(image, target, None)
    assert x.shape == (3, 80, 80) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1 and (x[:, :, 40:] == 0).all()
    assert out["boxes"].tolist() == [[4, 8, 20, 40]] and out["labels"].tolist() == [3]
    assert out["scale"] == 2.0 and out["image_id"] == 9
    assert out["masks"].shape == (1, 80, 80) and mask_box(out["masks"][0]) == [4, 8, 20, 40]


def test_detect_transform_keeps_masks_and_boxes_in_agreement(fmnist_root):
    ds = FashionMosaic(fmnist_root, "train", size=6, items=(2, 3), seed=2)
    exact, half = DetectTransform(size=112, train=False), DetectTransform(size=84, train=False)
    for i in range(len(ds)):
        image, target = ds[i]
        x, out = exact(image, target, None)  # 2x: agreement is exact
        assert x.shape == (1, 112, 112) and set(out) >= {"boxes", "labels", "masks", "scale"}
        assert "semantic" not in out
        for box, mask in zip(out["boxes"], out["masks"], strict=True):
            assert mask_box(mask) == box.tolist()
        _, out = half(image, target, None)  # 1.5x: within a pixel
        for box, mask in zip(out["boxes"], out["masks"], strict=True):
            assert (torch.tensor(mask_box(mask), dtype=torch.float32) - box).abs().max() <= 1


def test_detect_transform_hflip_and_crop(fmnist_root):
    image, target = FashionMosaic(fmnist_root, "train", size=4, items=(2, 3), seed=5)[0]
    flip = DetectTransform(size=56, train=True, hflip=1.0)
    x, out = flip(image, target, gen(0))
    b = target["boxes"]
    assert torch.equal(out["boxes"], torch.stack([56 - b[:, 2], b[:, 1], 56 - b[:, 0], b[:, 3]], 1))
    assert torch.equal(x, image.flip(-1).float() / 255)
    for box, mask in zip(out["boxes"], out["masks"], strict=True):
        assert mask_box(mask) == box.tolist()
    crop = DetectTransform(size=56, train=True, scale=(2.0, 2.0), hflip=0.5)
    for seed in range(6):
        x, out = crop(image, target, gen(seed))
        x2, out2 = crop(image, target, gen(seed))
        assert torch.equal(x, x2) and torch.equal(out["boxes"], out2["boxes"])
        k = len(out["labels"])
        assert x.shape == (1, 56, 56) and out["masks"].shape == (k, 56, 56)
        assert out["boxes"].shape == (k, 4) and k <= len(target["labels"])
        boxes = out["boxes"]
        assert (boxes >= 0).all() and (boxes <= 56).all()
        assert (boxes[:, 2:] - boxes[:, :2] >= 1).all()
        for box, mask in zip(boxes, out["masks"], strict=True):
            if mask.any():  # the mask's part inside the crop lies in the clipped box
                mb = mask_box(mask)
                assert mb[0] >= box[0] and mb[1] >= box[1] and mb[2] <= box[2] and mb[3] <= box[3]


# --- view and collation ----------------------------------------------------------------------


def test_dense_view_seeds_by_seed_epoch_index(fmnist_root):
    base = FashionMosaic(fmnist_root, "train", size=4)
    t = SegmentTransform(size=32, mean=base.mean, std=base.std, train=True)
    view = DenseView(base, t, seed=5)
    assert len(view) == 4
    x, out = view[2]
    image, target = base[2]
    ex, eout = t(image, target, gen(sample_seed(5, 0, 2)))
    assert torch.equal(x, ex) and torch.equal(out["semantic"], eout["semantic"])
    view.set_epoch(1)
    x1, _ = view[2]
    ex1, _ = t(image, target, gen(sample_seed(5, 1, 2)))
    assert torch.equal(x1, ex1)


def test_collate_functions(fmnist_root):
    base = FashionMosaic(fmnist_root, "train", size=3)
    images, targets = detection_collate([base[0], base[1]])
    assert isinstance(images, list) and len(images) == len(targets) == 2
    assert targets[1]["image_id"] == 1
    t = SegmentTransform(size=32, mean=base.mean, std=base.std, train=True)
    view = DenseView(base, t)
    x, y = segmentation_collate([view[0], view[1], view[2]])
    assert x.shape == (3, 1, 32, 32) and y.shape == (3, 32, 32) and y.dtype == torch.int64
    small = seg_sample(8, 8, channels=1)
    with pytest.raises(ValueError, match="batch size 1"):
        segmentation_collate([base[0], small])
