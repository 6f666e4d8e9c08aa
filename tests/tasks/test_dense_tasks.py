"""``mimkit segment`` and ``mimkit detect`` end to end: tiny encoders, a tiny Fashion-MNIST-like
mosaic, CPU, seconds. Also the metrics on hand-made cases with known answers."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.config import ConfigError, load_config
from mimkit.config.dense import DetectConfig, SegmentConfig
from mimkit.engine import checkpoint as ckpt
from mimkit.engine.optim import linear_lr
from mimkit.tasks.detect import evaluate_detector, run_detect
from mimkit.tasks.pretrain import run_pretrain
from mimkit.tasks.segment import evaluate_segmenter, run_segment
from tests.conftest import DEMO, ROOT, assert_provenance, tiny_overrides

pytestmark = pytest.mark.slow  # segmentation and detection runs end to end

SEG = ROOT / "configs" / "segment" / "fmnist_mosaic_vit_tiny.yaml"
DET = ROOT / "configs" / "detect" / "fmnist_mosaic_vit_tiny.yaml"


def write_idx(path, array: np.ndarray) -> None:
    """LeCun's IDX format (what Debian's dataset-fashion-mnist ships)."""
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    """A Fashion-MNIST-shaped folder: 28x28 items, a bright class-dependent shape each."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("t10k", 30)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = np.zeros((n, 28, 28), np.uint8)
        for i, c in enumerate(labels):
            h, w = 8 + 2 * (c % 5), 8 + 3 * (c // 5) * 2  # class-dependent size
            y, x = 14 - h // 2, 14 - w // 2
            images[i, y : y + h, x : x + w] = 120 + 12 * c + rng.integers(0, 10, (h, w))
        write_idx(root / f"{split}-images-idx3-ubyte", images)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Tiny 1-channel MAE and BEiT (pixel target) pretraining runs at 16 px, 4 px patches."""
    runs = {}
    for method in ("mae", "beit"):
        run = tmp_path_factory.mktemp(method) / "run"
        extra = {"train.epochs": 1, "model.in_chans": 1, "model.depth": 4}
        if method == "beit":
            extra |= {
                "model.method": "beit",
                "mask.strategy": "blockwise",
                "mask.num_masked": 6,
                "mask.min_block": 2,
                "target.kind": "pixels",
            }
        base = [a for a in tiny_overrides(run) if not a.startswith(tuple(extra))]
        run_pretrain(load_config(DEMO, base + [f"{k}={v}" for k, v in extra.items()]))
        runs[method] = run
    return runs


def _args(run_dir, fmnist, init, **extra) -> list[str]:
    values = {
        "run.dir": str(run_dir),
        "data.root": str(fmnist),
        "data.train_size": 16,
        "data.eval_size": 6,
        "data.canvas": 32,
        "data.items": "[1,2]",
        "data.item_scale": "[0.5,0.75]",
        "data.num_workers": 0,
        "model.init": init,
        "model.img_size": 32,
        "train.epochs": 2,
        "train.batch_size": 4,
        "train.log_every_steps": 1,
        "optim.warmup_epochs": 0.5,
        "eval.batch_size": 3,
        "eval.figure_images": 2,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


SCRATCH = {
    "model.method": "mae",
    "model.arch": "custom",
    "model.patch_size": 4,
    "model.in_chans": 1,
    "model.embed_dim": 32,
    "model.depth": 4,
    "model.num_heads": 2,
}


# ---- segmentation ----


@pytest.mark.parametrize(
    ("init", "head"), [("mae", "upernet"), ("beit", "setr_pup"), ("scratch", "upernet")]
)
def test_segment_runs_and_writes_its_contract(tmp_path, fmnist, pretrained, init, head):
    run = tmp_path / "seg"
    extra = SCRATCH if init == "scratch" else {}
    source = "null" if init == "scratch" else str(pretrained[init])
    cfg = load_config(
        SEG,
        _args(run, fmnist, source, **{"head.kind": head, "head.channels": 16}, **extra),
        schema=SegmentConfig,
    )
    r = run_segment(cfg)
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "model_best.safetensors"):
        assert (run / name).is_file(), name
    assert (run / "figures" / "segmentation.png").stat().st_size > 1000
    assert (run / "figures" / "segment_curves.png").is_file()
    saved = json.loads((run / "eval.json").read_text())
    assert len(saved["history"]) == 2 and saved["best"]["mIoU"] == r.best["mIoU"]
    assert 0 <= r.last["mIoU"] <= 100 and 0 <= r.last["pixel_acc"] <= 100
    assert set(r.last["per_class_iou"]) == {"background", "T-shirt/top", *r.last["per_class_iou"]}
    state, meta = ckpt.load_weights(run / "model_last.safetensors")
    assert meta["kind"] == "segmenter" and meta["img_size"] == 32
    assert_provenance(meta, "segmenter")
    assert meta["pretrain_method"] == ("none" if init == "scratch" else init)
    assert any(k.startswith("encoder.blocks.") for k in state)
    if init != "scratch":
        assert any("interpolated" in n for n in r.notes)  # 16 px -> 32 px


def test_segment_resume_is_exact(tmp_path, fmnist, pretrained):
    def cfg(run, **extra):
        args = _args(run, fmnist, str(pretrained["mae"]), **{"head.channels": 16}, **extra)
        return load_config(SEG, [*args, "run.deterministic=true"], schema=SegmentConfig)

    full = run_segment(cfg(tmp_path / "full"))
    # cut at an epoch's end: its checkpoint is written before that epoch's evaluation
    run_segment(cfg(tmp_path / "cut", **{"train.max_steps": 4}))
    resumed = run_segment(cfg(tmp_path / "cut"), resume=True)
    a, _ = ckpt.load_weights(full.last_path)
    b, _ = ckpt.load_weights(resumed.last_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_segmentation_metrics_on_a_hand_made_case():
    class Fixed(torch.nn.Module):  # predicts the given label maps
        def __init__(self, preds):
            super().__init__()
            self.preds, self.i = preds, 0

        def forward(self, x):
            p = self.preds[self.i]
            self.i += 1
            return torch.nn.functional.one_hot(p, 3).permute(0, 3, 1, 2).float()

    truth = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 255]]])  # (1, 2, 4); 255 ignored
    pred = torch.tensor([[[0, 1, 1, 1], [0, 0, 2, 2]]])
    loader = [(torch.zeros(1, 1, 2, 4), truth)]
    m = evaluate_segmenter(
        Fixed([pred]), loader, num_classes=3, ignore_index=255, size=4, device=torch.device("cpu")
    )
    # class 0: inter 3, union 4; class 1: inter 2, union 4; class 2: inter 0, union 1
    assert m["per_class_iou"] == {"0": 75.0, "1": 50.0, "2": 0.0}
    assert m["mIoU"] == pytest.approx((75 + 50 + 0) / 3)
    assert m["pixel_acc"] == pytest.approx(100 * 5 / 7)


# ---- detection ----


@pytest.mark.parametrize(("init", "masks"), [("mae", True), ("beit", False)])
def test_detect_runs_and_writes_its_contract(tmp_path, fmnist, pretrained, init, masks):
    run = tmp_path / "det"
    extra = {
        "head.out_channels": 16,
        "head.representation_size": 32,
        "head.masks": str(masks).lower(),
        "head.score_threshold": 0.0,
    }
    cfg = load_config(DET, _args(run, fmnist, str(pretrained[init]), **extra), schema=DetectConfig)
    r = run_detect(cfg)
    assert (run / "figures" / "detection.png").stat().st_size > 1000
    assert (run / "figures" / "detect_curves.png").is_file()
    assert -1 <= r.last["box_map"] <= 100
    assert ("mask_map" in r.last) == masks
    state, meta = ckpt.load_weights(run / "model_best.safetensors")
    assert meta["kind"] == "detector" and meta["layout"] == "torchvision-rcnn"
    assert any("mask_head" in k for k in state) == masks
    if init == "beit":  # benchmarks/detect_diagnose.py reads the run back: the same box mAP
        d = _diagnose_module().diagnose(run)
        assert d["box_map"] == pytest.approx(r.last["box_map"], abs=1e-3)
        for key in ("agnostic_map", "oracle_class_map", "gt_box_acc", "probe_tuned"):
            assert -100 <= d[key] <= 100, key


def _diagnose_module():
    import importlib.util

    path = ROOT / "benchmarks" / "detect_diagnose.py"
    spec = importlib.util.spec_from_file_location("detect_diagnose", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_detect_diagnosis_takes_classes_from_the_truth():
    relabel = _diagnose_module().labels_from_truth
    truth = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]),
        "labels": torch.tensor([3, 7]),
    }
    pred = {
        # on the first object, on the second (IoU 0.64), and on nothing
        "boxes": torch.tensor([[0.0, 0, 10, 10], [22, 22, 30, 30], [40, 40, 50, 50]]),
        "labels": torch.tensor([1, 1, 5]),
    }
    assert relabel(pred, truth).tolist() == [3, 7, 5]
    assert relabel(pred, truth, iou=0.7).tolist() == [3, 1, 5]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    assert relabel(pred, empty).tolist() == [1, 1, 5]


def test_detection_map_on_a_hand_made_case():
    class Fixed(torch.nn.Module):
        def __init__(self, outs):
            super().__init__()
            self.outs = outs

        def forward(self, images):
            return self.outs

    truth = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]),
        "labels": torch.tensor([1, 2]),
    }
    perfect = {**truth, "scores": torch.tensor([0.9, 0.8])}
    loader = [([torch.zeros(1, 32, 32)], [truth])]
    m = evaluate_detector(Fixed([perfect]), loader, device=torch.device("cpu"))
    assert m["box_map"] == pytest.approx(100.0) and m["box_map_50"] == pytest.approx(100.0)
    # one of the two objects found (the other box misses): AP 100 for class 1, 0 for class 2
    half = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [0, 20, 5, 25]]),
        "labels": torch.tensor([1, 2]),
        "scores": torch.tensor([0.9, 0.8]),
    }
    m = evaluate_detector(
        Fixed([half]), loader, device=torch.device("cpu"), classes=("bg", "a", "b")
    )
    assert m["box_map"] == pytest.approx(50.0)
    assert m["box_ap_per_class"] == {"a": 100.0, "b": 0.0}
    # COCO: a detection on a crowd region is not a false positive
    crowd = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]),
        "labels": torch.tensor([1, 1]),
        "iscrowd": torch.tensor([0, 1]),
        "area": torch.tensor([100.0, 100.0]),
    }
    both = {"boxes": crowd["boxes"], "labels": crowd["labels"], "scores": torch.tensor([0.5, 0.9])}
    loader = [([torch.zeros(1, 32, 32)], [crowd])]
    m = evaluate_detector(Fixed([both]), loader, device=torch.device("cpu"))
    assert m["box_map"] == pytest.approx(100.0)
    # without the crowd region, the higher-scored box is a false positive ranked first
    alone = {"boxes": crowd["boxes"][:1], "labels": crowd["labels"][:1]}
    loader = [([torch.zeros(1, 32, 32)], [alone])]
    m = evaluate_detector(Fixed([both]), loader, device=torch.device("cpu"))
    assert m["box_map"] == pytest.approx(50.0, abs=1.0)


# ---- configs, CLI, the user's own data ----


@pytest.mark.parametrize(
    ("schema", "recipe", "override", "needle"),
    [
        (SegmentConfig, SEG, "head.kind=fcn", "head.kind"),
        (SegmentConfig, SEG, "eval.mode=tiles", "eval.mode"),
        (SegmentConfig, SEG, "data.name=coco", "data.name"),
        (SegmentConfig, SEG, "head.out_indices=[1,2,3,9]", "head.out_indices"),
        (SegmentConfig, SEG, "optim.schedule=step", "optim.schedule"),
        (DetectConfig, DET, "head.scales=[3.0]", "head.scales"),
        (DetectConfig, DET, "head.anchor_sizes=[8,16]", "head.anchor_sizes"),
        (DetectConfig, DET, "data.name=ade20k", "data.name"),
        (DetectConfig, DET, "head.rpn_pre_nms_top_n=[100]", "head.rpn_pre_nms_top_n"),
        (DetectConfig, DET, "head.scales=[4.0,1.0]", "head.scales"),
        (DetectConfig, DET, "head.out_indices=[0,9,1]", "head.out_indices"),
        (SegmentConfig, SEG, "data.ignore_index=3", "data.ignore_index"),
        (DetectConfig, DET, "data.items=[3,1]", "data.items"),
    ],
)
def test_dense_config_errors_name_the_key(
    tmp_path, fmnist, pretrained, schema, recipe, override, needle
):
    args = _args(tmp_path / "r", fmnist, str(pretrained["mae"]))
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(recipe, [*args, override], schema=schema)


def test_ade20k_and_coco_data_need_their_files(tmp_path, fmnist, pretrained):
    args = _args(tmp_path / "r", fmnist, str(pretrained["mae"]))
    with pytest.raises(ConfigError, match="ADE20K layout"):
        load_config(SEG, [*args, "data.name=ade20k", f"data.root={tmp_path}"], schema=SegmentConfig)
    with pytest.raises(ConfigError, match=r"data\.ann_file"):
        load_config(DET, [*args, "data.name=coco", f"data.root={tmp_path}"], schema=DetectConfig)


def test_linear_schedule():
    kw = {"lr": 1.0, "min_lr": 0.0, "warmup_steps": 10, "total_steps": 110}
    assert linear_lr(5, **kw) == 0.5 and linear_lr(10, **kw) == 1.0
    assert linear_lr(60, **kw) == pytest.approx(0.5) and linear_lr(110, **kw) == 0.0


def _ade20k(root, n=4, size=(40, 48)):
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            label = np.zeros(size, np.uint8)
            label[: size[0] // 2] = 1 + i % 3  # top half: one of three classes; bottom: "other"
            img = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
            img[: size[0] // 2] += 60 * (1 + i % 3)
            Image.fromarray(img).save(root / "images" / split / f"im{i}.jpg")
            Image.fromarray(label).save(root / "annotations" / split / f"im{i}.png")
    (root / "classes.txt").write_text("wall\nsky\nfloor\n")


def _coco(root, n=4, size=40):
    rng = np.random.default_rng(0)
    images, anns = [], []
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(n):
            img = rng.integers(0, 40, (size, size + 8, 3), dtype=np.uint8)
            x, y = 4 + 3 * i, 6 + 2 * i
            img[y : y + 12, x : x + 14] = 220
            Image.fromarray(img).save(root / split / f"{i}.png")
            images.append(
                {"id": 10 + i, "file_name": f"{i}.png", "height": size, "width": size + 8}
            )
            poly = [x, y, x + 14, y, x + 14, y + 12, x, y + 12]
            anns.append(
                {"id": i + 1, "image_id": 10 + i, "category_id": 5 + 2 * (i % 2),
                 "bbox": [x, y, 14, 12], "area": 168, "iscrowd": 0, "segmentation": [poly]}
            )  # fmt: skip
        cats = [{"id": 5, "name": "box"}, {"id": 7, "name": "crate"}]
        (root / f"{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )


def test_segment_and_detect_on_user_folders_from_the_cli(tmp_path, pretrained, capsys):
    """ADE20K's folder layout and COCO-format annotations, 3-channel images, from scratch."""
    _ade20k(tmp_path / "ade")
    _coco(tmp_path / "coco")
    scratch = [f"{k}={v}" for k, v in SCRATCH.items() if k != "model.in_chans"]
    common = [
        "model.init=null",
        "model.in_chans=3",
        "model.img_size=32",
        *scratch,
        "train.epochs=1",
        "train.batch_size=2",
        "data.num_workers=0",
        "eval.figure_images=2",
    ]
    seg = [
        "segment",
        "-c",
        str(SEG),
        f"run.dir={tmp_path / 'seg'}",
        "data.name=ade20k",
        f"data.root={tmp_path / 'ade'}",
        "eval.mode=slide",
        "eval.stride=16",
        "head.channels=16",
        *common,
    ]
    assert main(seg) == 0
    out = json.loads((tmp_path / "seg" / "eval.json").read_text())["best"]
    assert set(out["per_class_iou"]) == {"wall", "sky", "floor"}
    assert "mIoU" in capsys.readouterr().out
    det = [
        "detect",
        "-c",
        str(DET),
        f"run.dir={tmp_path / 'det'}",
        "data.name=coco",
        f"data.root={tmp_path / 'coco' / 'train'}",
        f"data.ann_file={tmp_path / 'coco' / 'train.json'}",
        f"data.eval_root={tmp_path / 'coco' / 'val'}",
        f"data.eval_ann_file={tmp_path / 'coco' / 'val.json'}",
        "data.masks=true",
        "head.out_channels=16",
        "head.representation_size=32",
        *common,
    ]
    assert main(det) == 0
    _, meta = ckpt.load_weights(tmp_path / "det" / "model_last.safetensors")
    assert meta["classes"] == ["background", "box", "crate"] and meta["num_classes"] == 3
    assert_provenance(meta, "detector")
    assert (tmp_path / "det" / "figures" / "detection.png").is_file()
    assert main(["segment", "-c", str(SEG), "data.name=nope", *common]) == 2
    assert "data.name" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["segment", "detect"])
def test_eval_scores_a_dense_checkpoint_as_its_run_did(tmp_path, fmnist, pretrained, command,
                                                       capsys):  # fmt: skip
    """mimkit eval with a segment / detect recipe: the run's last checkpoint scores what the
    run's own last evaluation said, with the head read from the checkpoint; nothing trained."""
    from mimkit.cli import main

    recipe, schema = (SEG, SegmentConfig) if command == "segment" else (DET, DetectConfig)
    head = {"head.kind": "upernet", "head.channels": 16} if command == "segment" else {}
    run = tmp_path / "run"
    args = _args(run, fmnist, str(pretrained["mae"]), **head)
    r = (run_segment if command == "segment" else run_detect)(
        load_config(recipe, args, schema=schema)
    )
    primary = "mIoU" if command == "segment" else "box_map"
    ev = tmp_path / "ev"
    eval_args = [a for a in _args(ev, fmnist, str(run / "model_last.safetensors"))
                 if not a.startswith("train.")]  # fmt: skip
    assert main(["eval", "-c", str(recipe), *eval_args]) == 0
    got = json.loads((ev / "eval.json").read_text())["eval"]
    assert got["kind"] == ("segmenter" if command == "segment" else "detector")
    want = r.last[primary]
    assert (got[primary] is None and want is None) or got[primary] == pytest.approx(want, abs=1e-6)
    assert not (ev / "checkpoints").exists() and f"{primary}" in capsys.readouterr().out
    # a classifier recipe given a segmenter: said in one line
    ft = ROOT / "configs" / "finetune" / "fmnist_vit_tiny.yaml"
    assert main(["eval", "-c", str(ft), f"model.init={run / 'model_last.safetensors'}",
                 f"run.dir={tmp_path / 'x'}", "data.name=synthetic"]) == 2  # fmt: skip


@pytest.mark.parametrize("command", ["segment", "detect"])
def test_dense_dry_run_describes_the_run_and_writes_nothing(tmp_path, fmnist, pretrained,
                                                            command, capsys):  # fmt: skip
    from mimkit.cli import main

    recipe = SEG if command == "segment" else DET
    args = _args(tmp_path / "run", fmnist, str(pretrained["mae"]))
    assert main([command, "-c", str(recipe), *args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "16 images per epoch, 4 steps per epoch; 8 steps in total (2 epochs)" in out
    assert ("FLOP per optimizer step" in out) == (command == "segment")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "recipe",
    sorted((ROOT / "configs" / "segment").glob("ade20k_*.yaml"))
    + sorted((ROOT / "configs" / "detect").glob("coco_*.yaml")),
    ids=lambda p: p.name,
)
def test_the_paper_dense_recipes_build_at_their_real_size(tmp_path, recipe):
    """ADE20K / COCO recipes on stand-in files of their layouts: the ViT-B model and its head
    at 512 / 1024 px on the meta device (--dry-run's plan); model.init is a weights file with
    the provenance of the pretraining recipe it names, no tensors."""
    from mimkit.config import to_dict
    from mimkit.engine.checkpoint import save_weights
    from mimkit.tasks.dryrun import dense_plan

    seg = recipe.parent.name == "segment"
    pre_name = "beit_vit_base_in1k" if "beit" in recipe.name else "mae_vit_base_in1k"
    (tmp_path / "img.png").touch()
    pre = load_config(ROOT / "configs" / "pretrain" / f"{pre_name}.yaml",
                      [f"data.root={tmp_path}", f"tokenizer.checkpoint={recipe}"])  # fmt: skip
    init = tmp_path / "init.safetensors"
    save_weights(init, {"stub": torch.zeros(1)},
                 metadata={"format": "mimkit", "model_config": to_dict(pre.model)})  # fmt: skip
    if seg:
        _ade20k(tmp_path / "ade")
        data = [f"data.root={tmp_path / 'ade'}"]
    else:
        _coco(tmp_path / "coco")
        c = tmp_path / "coco"
        data = [f"data.root={c / 'train'}", f"data.ann_file={c / 'train.json'}",
                f"data.eval_root={c / 'val'}", f"data.eval_ann_file={c / 'val.json'}"]  # fmt: skip
    args = [*data, f"model.init={init}", f"run.dir={tmp_path / 'r'}", "data.num_workers=0"]
    cfg = load_config(recipe, args, schema=SegmentConfig if seg else DetectConfig)
    plan = dense_plan(cfg)
    assert plan.encoder_params > 85e6 and plan.params > plan.encoder_params  # ViT-B + its head
    assert plan.images == 4 and (plan.flops_per_step > 0) == seg
