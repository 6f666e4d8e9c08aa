"""Downstream: fine-tuning, intermediate fine-tuning, linear probes, k-NN, figures (tiny, CPU)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.config import ConfigError, ModelConfig, load_config
from mimkit.config.downstream import (
    FinetuneConfig,
    KnnCommandConfig,
    LinprobeConfig,
    ProbeConfig,
)
from mimkit.data import (
    AugmentedView,
    EvalTransform,
    FinetuneTransform,
    SyntheticImages,
    class_balanced_subset,
    labeled_subset,
)
from mimkit.engine import checkpoint as ckpt
from mimkit.engine.optim import cosine_lr, layer_decay_param_groups, set_lr
from mimkit.models import build_encoder
from mimkit.models.heads import Classifier
from mimkit.tasks.finetune import build_classifier, run_finetune
from mimkit.tasks.knn import extract_features, run_knn
from mimkit.tasks.linprobe import block_features, run_linprobe, train_probes
from mimkit.tasks.pretrain import run_pretrain
from mimkit.tasks.visualize import visualize_attention, visualize_reconstruction
from tests.conftest import DEMO, ROOT, assert_provenance, tiny_overrides

FT = ROOT / "configs" / "finetune" / "fmnist_vit_tiny.yaml"
LP = ROOT / "configs" / "linprobe" / "fmnist_vit_tiny.yaml"
KNN = ROOT / "configs" / "knn" / "fmnist_vit_tiny.yaml"

TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2)


def _vit(method: str, **extra) -> torch.nn.Module:
    cfg = ModelConfig(method=method, arch="custom", **TINY, **extra)
    torch.manual_seed(0)
    return build_encoder(cfg, fixed_pos_embed=False, mask_token=False)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Tiny MAE and BEiT (pixel target) pretraining runs on synthetic images."""
    runs = {}
    for method in ("mae", "beit"):
        run = tmp_path_factory.mktemp(method)
        extra = {"train.epochs": 1}
        if method == "beit":
            extra |= {
                "model.method": "beit",
                "mask.strategy": "blockwise",
                "mask.num_masked": 6,
                "mask.min_block": 2,
                "target.kind": "pixels",
            }
        args = [a for a in tiny_overrides(run / "run") if not a.startswith("train.epochs")]
        run_pretrain(load_config(DEMO, args + [f"{k}={v}" for k, v in extra.items()]))
        runs[method] = run / "run"
    return runs


def _ft_args(run_dir, init, **extra) -> list[str]:
    values = {
        "run.dir": str(run_dir),
        "data.name": "synthetic",
        "data.synthetic_size": 64,
        "data.eval_max_samples": 40,
        "data.num_workers": 0,
        "model.init": init,
        "train.epochs": 2,
        "train.batch_size": 8,
        "train.log_every_steps": 2,
        "optim.warmup_epochs": 1,
        "val_fraction": 0,  # all 64 images train; the tests of the held-out split set it
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


SCRATCH = {
    "model.method": "mae",
    "model.arch": "custom",
    **{f"model.{k}": v for k, v in TINY.items()},
}


# ---- layer-wise lr decay ----


@pytest.mark.parametrize("method", ["mae", "beit"])
def test_layer_decay_groups_cover_every_parameter_once_with_the_specified_scales(method):
    extra = {"rel_pos_bias": "per_layer"} if method == "beit" else {}
    model = Classifier(_vit(method, **extra), num_classes=5, pool="avg")
    decay = 0.65
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=decay)
    names = [n for g in groups for n in g["names"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable) and len(names) == len(set(names))
    top = model.num_layers - 1  # depth + 1
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert scale["encoder.patch_embed.proj.weight"] == pytest.approx(decay ** (TINY["depth"] + 1))
    assert scale["encoder.cls_token"] == pytest.approx(decay**top)
    assert scale["encoder.blocks.0.mlp.fc1.weight"] == pytest.approx(decay ** TINY["depth"])
    assert scale["encoder.blocks.1.attn.proj.weight"] == pytest.approx(decay)
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    for g in groups:
        assert g["lr_scale"] == pytest.approx(decay ** (top - g["layer_id"]))
    assert wd["head.weight"] == 0.05 and wd["encoder.blocks.0.mlp.fc1.weight"] == 0.05
    for exempt in (
        "head.bias",
        "fc_norm.weight",
        "encoder.cls_token",
        "encoder.blocks.0.norm1.weight",
    ):
        assert wd[exempt] == 0.0
    if method == "mae":
        assert wd["encoder.pos_embed"] == 0.0
    else:
        assert wd["encoder.blocks.0.attn.relative_position_bias_table"] == 0.0
    opt = torch.optim.AdamW(groups, lr=1.0)
    set_lr(opt, 2.0)
    assert all(g["lr"] == pytest.approx(2.0 * g["lr_scale"]) for g in opt.param_groups)


def test_head_lr_mult_scales_only_the_task_head():
    model = Classifier(_vit("mae"), num_classes=5, pool="avg")
    plain = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=0.65)
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=0.65, head_lr_mult=10)
    before = {n: g["lr_scale"] for g in plain for n in g["names"]}
    after = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert before.keys() == after.keys()
    for n, s in after.items():
        head = not n.startswith("encoder.")
        assert s == pytest.approx(before[n] * (10 if head else 1)), n
    assert after["head.weight"] == after["fc_norm.bias"] == 10.0
    assert after["encoder.blocks.1.mlp.fc2.weight"] == pytest.approx(0.65)  # not the head


# ---- the classifier is timm's, key for key ----


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_vit_classifier_loads_into_timm_and_gives_the_same_logits(pool):
    model = Classifier(_vit("mae"), num_classes=5, pool=pool, head_init_std=0.02).eval()
    ref = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, global_pool=pool if pool == "avg"
        else "token", fc_norm=pool == "avg", **TINY,
    ).eval()  # fmt: skip
    ref.load_state_dict(model.timm_state_dict(), strict=True)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_beit_classifier_loads_into_timm_and_gives_the_same_logits():
    enc = _vit("beit", rel_pos_bias="per_layer", layer_scale=0.1)
    model = Classifier(enc, num_classes=5, pool="avg", head_init_std=0.02).eval()
    ref = timm.models.beit.Beit(
        num_classes=5, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1, **TINY
    ).eval()
    ref.load_state_dict(model.timm_state_dict(), strict=True)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


# ---- fine-tuning from MAE, BEiT, scratch; intermediate fine-tuning; other resolutions ----


@pytest.mark.parametrize("init", ["mae", "beit", "scratch"])
def test_finetune_runs_and_writes_its_contract(tmp_path, pretrained, init):
    extra = SCRATCH if init == "scratch" else {}
    cfg = load_config(
        FT, _ft_args(tmp_path / "ft", pretrained.get(init, "null"), **extra), schema=FinetuneConfig
    )
    res = run_finetune(cfg)
    run = tmp_path / "ft"
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "model_best.safetensors",
                 "model_last.safetensors", "figures/finetune_curves.png"):  # fmt: skip
        assert (run / name).is_file(), name
    assert res.train.step == 2 * (64 // 8) and len(res.history) == 2
    assert 0 <= res.best["top1"] <= 100 and res.best["top5"] >= res.best["top1"]
    meta = ckpt.read_metadata(run / "model_best.safetensors")
    assert meta["kind"] == "classifier" and meta["num_classes"] == 10 and meta["pool"] == "avg"
    assert meta["pretrain_method"] == ("none" if init == "scratch" else init)
    assert_provenance(meta, "classifier")
    assert meta["pretrain"].get("method") == (None if init == "scratch" else init)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "eval"] == [1, 2]
    state, _ = ckpt.load_weights(run / "model_last.safetensors")
    assert "head.weight" in state and "fc_norm.weight" in state and "norm.weight" not in state
    assert not any(k.startswith(("decoder", "lm_head", "mask_token")) for k in state)
    if init == "beit":  # the shared pretraining table became one table per block
        assert "blocks.1.attn.relative_position_bias_table" in state
        assert any("copied into 2 blocks" in n for n in res.notes)


def test_pretrained_weights_arrive_in_the_classifier(pretrained):
    cfg = load_config(FT, _ft_args("unused", pretrained["mae"]), schema=FinetuneConfig)
    model, _, _ = build_classifier(cfg, num_classes=10)
    enc, _ = ckpt.load_weights(pretrained["mae"] / "encoder.safetensors")
    mine = model.timm_state_dict()
    for k, v in enc.items():
        if not k.startswith("norm."):
            torch.testing.assert_close(mine[k], v, atol=0, rtol=0)


def test_intermediate_finetuning_keeps_or_replaces_the_head(tmp_path, pretrained):
    first = tmp_path / "first"
    run_finetune(load_config(FT, _ft_args(first, pretrained["beit"]), schema=FinetuneConfig))
    saved, _ = ckpt.load_weights(first / "model_best.safetensors")
    # same classes: the encoder and the head are kept
    cfg = load_config(FT, _ft_args(tmp_path / "b", first), schema=FinetuneConfig)
    assert cfg.model.rel_pos_bias == "per_layer" and cfg.model.method == "beit"
    model, _, notes = build_classifier(cfg, num_classes=10)
    mine = model.timm_state_dict()
    assert sorted(mine) == sorted(saved) and "head kept (10 classes)" in notes
    for k, v in saved.items():
        torch.testing.assert_close(mine[k], v, atol=0, rtol=0)
    # another class count: a fresh head, the encoder kept
    model, _, notes = build_classifier(cfg, num_classes=7)
    assert model.head.weight.shape == (7, 32) and any("head replaced" in n for n in notes)
    torch.testing.assert_close(
        model.timm_state_dict()["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"]
    )
    res = run_finetune(cfg)  # and it trains
    assert res.best_path is not None


@pytest.mark.parametrize("init", ["mae", "beit"])
def test_finetune_at_another_resolution_interpolates_position_tables(tmp_path, pretrained, init):
    cfg = load_config(
        FT, _ft_args(tmp_path / "ft", pretrained[init], **{"model.img_size": 24,
                                                           "train.epochs": 1}),
        schema=FinetuneConfig,
    )  # fmt: skip
    res = run_finetune(cfg)
    assert any("interpolated" in n and "16px to 24px" in n for n in res.notes)
    state, _ = ckpt.load_weights(tmp_path / "ft" / "model_last.safetensors")
    if init == "mae":
        assert state["pos_embed"].shape == (1, 1 + 36, 32)
    else:
        assert state["blocks.0.attn.relative_position_bias_table"].shape == (11 * 11 + 3, 2)


def test_finetune_resume_is_exact(tmp_path, pretrained):
    """Mixup, RandAugment, erasing and drop path all replay after a resume."""
    extra = {
        "aug.mixup": 0.8,
        "aug.cutmix": 1.0,
        "aug.rand_augment": "rand-m9-mstd0.5-inc1",
        "aug.reprob": 0.25,
        "run.deterministic": True,
    }
    straight = tmp_path / "straight"
    run_finetune(load_config(FT, _ft_args(straight, pretrained["mae"], **extra),
                             schema=FinetuneConfig))  # fmt: skip
    split = tmp_path / "split"
    first = load_config(
        FT,
        _ft_args(split, pretrained["mae"], **extra, **{"train.max_steps": 5}),
        schema=FinetuneConfig,
    )
    assert run_finetune(first).train.stopped_early
    run_finetune(load_config(FT, _ft_args(split, pretrained["mae"], **extra),
                             schema=FinetuneConfig), resume=True)  # fmt: skip
    a, _ = ckpt.load_weights(straight / "model_last.safetensors")
    b, _ = ckpt.load_weights(split / "model_last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def rows(run):  # metrics.jsonl without wall-clock fields: one row per step and kind
        out = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["kind"], r["step"]) for r in out]

    # no row repeated by the resume; the stop at max_steps logged its own step-5 rows
    assert len(set(rows(split))) == len(rows(split)) and set(rows(straight)) <= set(rows(split))
    history = json.loads((split / "eval.json").read_text())["history"]
    assert [h["step"] for h in history] == [s for k, s in rows(split) if k == "eval"]


def test_ema_weights_are_tracked_and_evaluated(tmp_path, pretrained):
    cfg = load_config(
        FT, _ft_args(tmp_path / "ft", pretrained["mae"], **{"ema.enabled": True,
                                                            "ema.decay": 0.5}),
        schema=FinetuneConfig,
    )  # fmt: skip
    res = run_finetune(cfg)
    assert "ema_top1" in res.history[-1] and res.best["which"] in ("model", "ema")


# ---- labels ----


def test_label_fraction_is_class_balanced_seeded_and_nested_in_the_data():
    labels = torch.arange(1000) % 10
    a = class_balanced_subset(labels, 0.05, seed=0)
    assert len(a) == 50 and torch.bincount(labels[a]).tolist() == [5] * 10
    assert torch.equal(a, class_balanced_subset(labels, 0.05, seed=0))
    assert not torch.equal(a, class_balanced_subset(labels, 0.05, seed=1))
    tiny = class_balanced_subset(labels, 0.0001, seed=0)
    assert torch.bincount(labels[tiny]).tolist() == [1] * 10  # at least one per class
    ds = labeled_subset(SyntheticImages(100, img_size=8), fraction=0.2, seed=3)
    assert len(ds) == 20


# ---- linear probe and k-NN ----


def test_linear_probe_leaves_the_encoder_unchanged_and_learns(pretrained):
    enc = _vit("mae")
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    view = AugmentedView(SyntheticImages(80, img_size=16), EvalTransform(16, [0.5] * 3, [0.25] * 3))
    x, y = block_features(enc, view, layers=[0, 1], pool="avg")
    assert x.shape == (2, 80, 32)
    p = ProbeConfig(optimizer="sgd", lr=0.5, epochs=30, warmup_epochs=2, batch_size=40)
    _, hist = train_probes(x, y, num_classes=10, p=p, seed=0, eval_sets={"train": (x, y)})
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in before.items())
    assert not any(p.grad is not None for p in enc.parameters())
    assert hist[-1]["loss"] < hist[0]["loss"] and max(hist[-1]["train_top1"]) > 50


def test_linprobe_command_probes_every_block(tmp_path, pretrained):
    before = (pretrained["mae"] / "encoder.safetensors").read_bytes()
    args = [f"run.dir={tmp_path / 'lp'}", "data.name=synthetic", "data.synthetic_size=64",
            "data.eval_max_samples=40", f"model.init={pretrained['mae']}", "probe.epochs=5",
            "probe.warmup_epochs=1", "probe.batch_size=16"]  # fmt: skip
    res = run_linprobe(load_config(LP, args, schema=LinprobeConfig))
    assert len(res.per_layer_top1) == 2 and len(res.val_top1) == 2 and res.raw_pixels
    rec = json.loads((tmp_path / "lp" / "eval.json").read_text())["linprobe"]
    assert rec["blocks"] == [1, 2] and rec["layer"] in (0, 1)
    assert_provenance(ckpt.read_metadata(tmp_path / "lp" / "probe.safetensors"), "linear_probe")
    assert (tmp_path / "lp" / "figures" / "linprobe_layers.png").is_file()
    assert (pretrained["mae"] / "encoder.safetensors").read_bytes() == before


def test_linprobe_dino_protocol_concatenates_cls_avg_of_the_last_blocks(tmp_path, pretrained):
    enc = _vit("mae").eval()
    view = AugmentedView(SyntheticImages(8, img_size=16), EvalTransform(16, [0.5] * 3, [0.25] * 3))
    x, _ = block_features(enc, view, layers=[1], pool="cls_avg")
    imgs = torch.stack([view[i][0] for i in range(8)])
    with torch.no_grad():
        tokens = enc.forward_features(imgs)
    assert x.shape == (1, 8, 64)
    torch.testing.assert_close(x[0], torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1))
    args = [f"run.dir={tmp_path / 'lp'}", "data.name=synthetic", "data.synthetic_size=64",
            "data.eval_max_samples=40", f"model.init={pretrained['mae']}", "probe.epochs=3",
            "probe.warmup_epochs=1", "probe.batch_size=16", "probe.layers=last",
            "probe.pool=cls_avg", "probe.last_blocks=2", "probe.raw_pixels=false"]  # fmt: skip
    res = run_linprobe(load_config(LP, args, schema=LinprobeConfig))
    rec = json.loads((tmp_path / "lp" / "eval.json").read_text())["linprobe"]
    assert rec["blocks"] == [1, 2] and rec["feature_dim"] == 2 * 2 * 32 and res.layer == 1
    assert len(res.per_layer_top1) == 1 and res.raw_pixels is None


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("probe.last_blocks=3", "probe.last_blocks"),  # the tiny encoder has 2 blocks
        ("probe.last_blocks=0", "probe.last_blocks"),
        ("probe.pool=max", "probe.pool"),
    ],
)
def test_linprobe_config_errors_name_the_key(tmp_path, pretrained, override, needle):
    base = [f"run.dir={tmp_path / 'lp'}", f"model.init={pretrained['mae']}", "data.name=synthetic"]
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(LP, [*base, "probe.layers=last", override], schema=LinprobeConfig)
    with pytest.raises(ConfigError, match=re.escape("probe.layers=all")):
        load_config(LP, [*base, "probe.last_blocks=2"], schema=LinprobeConfig)


def test_knn_features_of_any_block():
    enc = _vit("beit", rel_pos_bias="shared").eval()
    view = AugmentedView(SyntheticImages(16, img_size=16), EvalTransform(16, [0.5] * 3, [0.25] * 3))
    f0, _ = extract_features(enc, view, layer=0)
    x = torch.stack([view[i][0] for i in range(16)])
    with torch.no_grad():
        ref = enc.forward_intermediates(x, [0], norm=True)[0][:, 1:].mean(1)
        last = enc.forward_features(x)[:, 1:].mean(1)
    torch.testing.assert_close(f0, ref)
    torch.testing.assert_close(extract_features(enc, view, layer=-1)[0], last)


def test_knn_command_is_perfect_on_a_separable_set(tmp_path, pretrained):
    args = [f"run.dir={tmp_path / 'knn'}", "data.name=synthetic", "data.synthetic_size=100",
            "data.eval_max_samples=50", f"model.init={pretrained['beit']}", "knn.k=5",
            "knn.layer=0"]  # fmt: skip
    res = run_knn(load_config(KNN, args, schema=KnnCommandConfig))
    # the synthetic classes are oriented stripes: raw pixels separate them perfectly
    assert res["raw_pixels"].top1 == 100.0 and 0 <= res["encoder"].top1 <= 100
    assert json.loads((tmp_path / "knn" / "eval.json").read_text())["knn"]["encoder"]["layer"] == 0


# ---- errors ----


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("data.label_fraction=0", "data.label_fraction"),
        ("model.init=/nonexistent/run", "model.init='/nonexistent/run'"),
        ("model.pool=max", "model.pool"),
        ("train.steps=0", "train.steps"),
        ("optim.layer_decay=1.5", "optim.layer_decay"),
        ("optim.head_lr_mult=0", "optim.head_lr_mult"),
        ("aug.rand_augment=nonsense-m9", "aug.rand_augment"),
    ],
)
def test_finetune_config_errors_name_the_key(tmp_path, pretrained, override, needle):
    args = [*_ft_args(tmp_path, pretrained["mae"]), override]
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(FT, args, schema=FinetuneConfig)


def test_scratch_needs_an_architecture(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.method"):
        load_config(FT, _ft_args(tmp_path, "null"), schema=FinetuneConfig)


def test_odd_batch_with_mixup_is_refused(tmp_path, pretrained):
    extra = {"train.batch_size": 7, "aug.mixup": 0.8}
    cfg = load_config(
        FT, _ft_args(tmp_path / "x", pretrained["mae"], **extra), schema=FinetuneConfig
    )
    with pytest.raises(ConfigError, match="even"):
        run_finetune(cfg)


# ---- every command on a user's image folder with class subfolders ----


def _folder(root, n_per_class=6, classes=("cat", "dog", "fox")):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 60, (20, 20, 3), dtype=np.uint8)
            arr[:, :, c] += 150  # the class is the dominant channel
            Image.fromarray(arr).save(root / name / f"{i}.png")


def test_every_downstream_command_on_an_image_folder(tmp_path, capsys):
    _folder(tmp_path / "train")
    _folder(tmp_path / "val", n_per_class=3)
    pre = [a for a in tiny_overrides(tmp_path / "pre") if not a.startswith("data.")]
    assert main(["pretrain", "-c", str(DEMO), *pre, "data.name=folder",
                 f"data.root={tmp_path / 'train'}", "train.epochs=1",
                 "train.batch_size=6"]) == 0  # fmt: skip
    init = f"model.init={tmp_path / 'pre'}"
    folder = [f"data.root={tmp_path / 'train'}", "data.name=folder",
              f"data.eval_root={tmp_path / 'val'}", "data.num_workers=0", init]  # fmt: skip
    assert main(["finetune", "-c", str(FT), f"run.dir={tmp_path / 'ft'}", *folder,
                 "train.epochs=1", "train.batch_size=6"]) == 0  # fmt: skip
    assert main(["linprobe", "-c", str(LP), f"run.dir={tmp_path / 'lp'}", *folder,
                 "probe.epochs=3",
            "probe.warmup_epochs=1", "probe.batch_size=8"]) == 0  # fmt: skip
    assert main(["knn", "-c", str(KNN), f"run.dir={tmp_path / 'knn'}", *folder,
                 "knn.k=3"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert (
        "best validation top-1" in out
        and "test top-1" in out
        and "linear probe top-1" in out
        and "k-NN top-1 (encoder)" in out
    )
    meta = ckpt.read_metadata(tmp_path / "ft" / "model_best.safetensors")
    assert meta["classes"] == ["cat", "dog", "fox"] and meta["num_classes"] == 3
    png = tmp_path / "train" / "dog" / "0.png"
    assert main(["visualize", "attention", str(tmp_path / "ft"), str(png), "--patch", "1,2",
                 "--out", str(tmp_path / "att.png")]) == 0  # fmt: skip
    assert (tmp_path / "att.png").stat().st_size > 1000
    assert main(["visualize", "reconstruction", str(tmp_path / "pre"), str(png),
                 "--out", str(tmp_path / "rec.png")]) == 0  # fmt: skip
    assert (tmp_path / "rec.png").stat().st_size > 1000
    # a folder without eval_root is refused before any work, naming the key
    assert main(["finetune", "-c", str(FT), f"run.dir={tmp_path / 'x'}", *folder[:2], init]) == 2
    assert "data.eval_root" in capsys.readouterr().err


def test_visualize_from_python(tmp_path, pretrained):
    img = SyntheticImages(2, img_size=16)[1][0]
    paths = visualize_attention(str(pretrained["beit"]), images=[img], patches=[(1, 1), "cls"],
                                out=tmp_path / "a.png")  # fmt: skip
    assert paths == [tmp_path / "a.png"] and paths[0].stat().st_size > 1000
    with pytest.raises(ConfigError, match="outside"):
        visualize_attention(str(pretrained["beit"]), images=[img], patches=[(9, 0)])
    with pytest.raises(ConfigError, match="MAE checkpoint"):
        visualize_reconstruction(str(pretrained["beit"]), fashion_mnist=[], paths=["x.png"])
    eps = tmp_path / "figure.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n")  # Pillow's EPS plugin would run Ghostscript
    with pytest.raises(ConfigError, match=r"figure\.png: not a readable image"):
        visualize_attention(str(pretrained["beit"]), paths=[str(eps)])


@pytest.mark.parametrize("spec", ["rand-m10-mstd0.5-inc1", "rand-m0-mstd0.5", "rand-m9-mstd0.5"])
def test_rand_augment_extremes_work_with_current_pillow(spec):
    """timm maps extreme posterize levels to 0 bits, which Pillow refuses; we keep 1 bit."""
    tf = FinetuneTransform(28, [0.3], [0.3], rand_augment=spec, reprob=0.25)
    img = torch.randint(0, 255, (1, 28, 28), dtype=torch.uint8)
    outs = [tf(img, torch.Generator().manual_seed(i)) for i in range(300)]
    assert all(o.shape == (1, 28, 28) and torch.isfinite(o).all() for o in outs)
    again = tf(img, torch.Generator().manual_seed(7))
    assert torch.equal(again, outs[7])  # a function of the sample's generator


def test_a_budget_in_steps_spans_the_schedule(tmp_path):
    """train.steps: the schedule ends at the budget, even inside an epoch (8 steps per epoch)."""
    cfg = load_config(DEMO, [*tiny_overrides(tmp_path / "run"), "train.steps=11"])
    res = run_pretrain(cfg)
    assert res.train.step == 11 and res.train.epoch == 2 and not res.train.stopped_early
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] == "train"][-1]
    assert last["step"] == 11  # the lr of the last step follows a schedule 11 steps long
    expected = cosine_lr(10, lr=cfg.optim.lr, min_lr=0.0, warmup_steps=8, total_steps=11)
    assert last["lr"] == pytest.approx(expected) and expected < 0.3 * cfg.optim.lr
    assert (tmp_path / "run" / "checkpoints" / "ckpt-00000011").is_dir()


# ---- honest model selection: a validation split held out of the training labels ----


def test_holdout_split_is_disjoint_balanced_and_seeded():
    from mimkit.data import holdout_split

    base = SyntheticImages(size=200, img_size=8, channels=1)
    labeled = labeled_subset(base, fraction=0.5, seed=3)  # 100 images, 10 per class
    train, val = holdout_split(labeled, 0.2, seed=1)
    assert not set(train.indices) & set(val.indices)
    assert sorted(train.indices + val.indices) == sorted(labeled.indices)
    val_labels = [i % 10 for i in val.indices]  # SyntheticImages: label i % 10
    assert sorted(np.bincount(val_labels, minlength=10).tolist()) == [2] * 10
    again, _ = holdout_split(labeled, 0.2, seed=1)
    other, _ = holdout_split(labeled, 0.2, seed=2)
    assert again.indices == train.indices and other.indices != train.indices
    tiny = labeled_subset(base, fraction=0.005, seed=0)  # one image per class
    with pytest.raises(ValueError, match="at least 2 per class"):
        holdout_split(tiny, 0.1, seed=0)


def test_finetune_chooses_on_validation_and_scores_test_once(tmp_path, pretrained):
    cfg = load_config(
        FT,
        _ft_args(tmp_path / "ft", pretrained["mae"], val_fraction=0.25, **{"train.epochs": 3}),
        schema=FinetuneConfig,
    )
    res = run_finetune(cfg)
    run = tmp_path / "ft"
    saved = json.loads((run / "eval.json").read_text())
    assert saved["selection"] == "val"
    # 64 images, 10 classes: round(0.25 * n_c) held out of every class
    n_val = saved["history"][0]["num_images"]
    assert 10 <= n_val <= 20 and all(h["num_images"] == n_val for h in saved["history"])
    assert res.train.step == 3 * ((64 - n_val) // 8)
    # model_best is the best validation evaluation
    best = max(saved["history"], key=lambda h: h["top1"])
    assert res.best["step"] == best["step"] and res.best["top1"] == best["top1"]
    # the test split (40 images) scored once, with model_best's weights
    test = json.loads((run / "test.json").read_text())
    assert test == res.test and test["selected_on"] == "val" and test["num_images"] == 40
    assert test["selected"]["step"] == best["step"] and "note" not in test
    ref_cfg = load_config(
        FT, _ft_args("unused", run / "model_best.safetensors", **{"model.drop_path": 0}),
        schema=FinetuneConfig,
    )  # fmt: skip
    model, _, _ = build_classifier(ref_cfg, num_classes=10)
    from mimkit.data import build_dataset
    from mimkit.tasks.downstream import evaluate_classifier

    ds = build_dataset(ref_cfg.data, split="test", img_size=16, channels=3)
    ds = torch.utils.data.Subset(ds, range(40))
    meta = ckpt.read_metadata(run / "model_best.safetensors")
    loader = torch.utils.data.DataLoader(
        AugmentedView(ds, EvalTransform(16, meta["mean"], meta["std"])), batch_size=64
    )
    ref = evaluate_classifier(model, loader, device=torch.device("cpu"))
    assert ref["top1"] == test["top1"] and ref["loss"] == pytest.approx(test["loss"], rel=1e-5)


def test_finetune_without_validation_says_the_choice_is_optimistic(tmp_path, pretrained):
    res = run_finetune(
        load_config(FT, _ft_args(tmp_path / "ft", pretrained["mae"]), schema=FinetuneConfig)
    )
    assert res.test["selected_on"] == "eval" and "optimistic" in res.test["note"]
    assert res.train.step == 2 * (64 // 8)


@pytest.mark.parametrize("value", [1.0, -0.1])
def test_bad_val_fraction_is_named(value):
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(FT, _ft_args("unused", "null", val_fraction=value, **SCRATCH),
                    schema=FinetuneConfig)  # fmt: skip


def test_a_finetune_saved_before_val_fraction_resumes_as_it_was(tmp_path, monkeypatch):
    """A run saved before ``val_fraction`` existed chose model_best on the evaluation split:
    resuming it with today's default (a held-out split) would change its data mid-run."""
    import dataclasses

    import yaml

    from mimkit.engine.rundir import prepare_run

    run = tmp_path / "old"
    cfg = load_config(FT, _ft_args(run, "null", **SCRATCH), schema=FinetuneConfig)
    saved = dataclasses.asdict(cfg)
    del saved["val_fraction"]  # the saved config of an old run
    (run / "checkpoints" / "ckpt-00000001").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    monkeypatch.setattr(ckpt, "latest_checkpoint", lambda root: root / "ckpt-00000001")
    new = load_config(FT, _ft_args(run, "null", val_fraction=0.1, **SCRATCH), schema=FinetuneConfig)
    with pytest.raises(ConfigError, match=r"val_fraction=0\.1 differs .* saved value 0\.0"):
        prepare_run(new, resume=True)
    prepare_run(cfg, resume=True)  # val_fraction=0: as it was


def test_resume_keeps_the_saved_precision_when_auto_would_change_it(tmp_path, monkeypatch):
    import yaml

    from mimkit.engine.rundir import prepare_run

    run = tmp_path / "r"
    monkeypatch.setenv("MIMKIT_PRECISION_AUTO", "fp32")
    cfg = load_config(FT, _ft_args(run, "null", **SCRATCH), schema=FinetuneConfig)
    prepare_run(cfg, resume=False)
    (run / "checkpoints" / "ckpt-00000001").mkdir(parents=True)
    monkeypatch.setattr(ckpt, "latest_checkpoint", lambda root: root / "ckpt-00000001")
    monkeypatch.setenv("MIMKIT_PRECISION_AUTO", "bf16")  # other hardware, or a newer mimkit
    again = load_config(FT, _ft_args(run, "null", **SCRATCH), schema=FinetuneConfig)
    assert again.train.precision == "bf16"
    prepare_run(again, resume=True)
    assert again.train.precision == "fp32"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["precision"] == "fp32"
    explicit = load_config(FT, _ft_args(run, "null", **SCRATCH, **{"train.precision": "bf16"}),
                           schema=FinetuneConfig)  # fmt: skip
    with pytest.raises(ConfigError, match=r"train\.precision"):
        prepare_run(explicit, resume=True)  # asked for explicitly: refused, as any change


# ---- mimkit eval ----


def test_eval_scores_an_official_finetuned_checkpoint_as_timm_does(tmp_path, capsys):
    """An official MAE fine-tuned checkpoint (a timm ViT with random weights, saved as the
    official main_finetune.py saves it), converted, then scored: the same logits and top-1 as
    timm's own forward on the same images; nothing is trained."""
    import timm

    from mimkit.cli import main
    from mimkit.data import AugmentedView, EvalTransform
    from mimkit.tasks.downstream import classify_data, pretraining_normalization
    from mimkit.tasks.evaluate import run_eval
    from tests.interop.test_interop_official import write_official

    torch.manual_seed(0)
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=16, patch_size=4,
                            embed_dim=32, depth=2, num_heads=2, num_classes=10,
                            global_pool="avg").eval()  # fmt: skip
    official = write_official(tmp_path / "checkpoint-99.pth", ref.state_dict(),
                              {"model": "vit_base_patch16", "global_pool": True})  # fmt: skip
    converted = tmp_path / "ft.safetensors"
    assert main(["convert", str(official), str(converted), "--num-heads", "2"]) == 0
    args = [f"model.init={converted}", f"run.dir={tmp_path / 'ev'}", "data.name=synthetic",
            "data.synthetic_size=40", "data.num_workers=0", "train.precision=fp32"]  # fmt: skip
    cfg = load_config(FT, args, schema=FinetuneConfig)
    res = run_eval(cfg, keep_logits=True)
    mean, std = pretraining_normalization(str(converted))  # the official one: ImageNet's
    assert mean is not None and std is not None
    data = classify_data(cfg.data, img_size=16, channels=3, seed=0, mean=mean, std=std)
    view = AugmentedView(data.eval, EvalTransform(16, data.mean, data.std))
    imgs = torch.stack([view[i][0] for i in range(len(view))])
    with torch.no_grad():
        want = ref(imgs)
    torch.testing.assert_close(res.logits, want, rtol=1e-5, atol=1e-5)
    top1 = 100.0 * float((want.argmax(1) == res.labels).float().mean())
    assert res.metrics["top1"] == pytest.approx(top1) and res.metrics["num_images"] == len(view)
    # the CLI: eval.json, and nothing trained
    assert main(["eval", "-c", str(FT), *args]) == 0
    out = capsys.readouterr().out
    assert f"top-1 {top1:.2f}%" in out
    record = json.loads((tmp_path / "ev" / "eval.json").read_text())["eval"]
    assert record["top1"] == pytest.approx(top1) and record["pool"] == "avg"
    assert not (tmp_path / "ev" / "checkpoints").exists()
    # a training run's directory is refused: its eval.json and config.yaml stay as they are
    (tmp_path / "ev" / "metrics.jsonl").touch()
    assert main(["eval", "-c", str(FT), *args]) == 2
    assert "holds a training run" in capsys.readouterr().err


def test_eval_refuses_a_checkpoint_without_a_head(tmp_path, pretrained, capsys):
    from mimkit.cli import main

    args = ["eval", "-c", str(FT), f"model.init={pretrained['mae']}", f"run.dir={tmp_path}",
            "data.name=synthetic"]  # fmt: skip
    assert main(args) == 2
    assert "has no classifier head" in capsys.readouterr().err


def test_partial_finetuning_trains_only_the_last_blocks(tmp_path, pretrained):
    """MAE's partial fine-tuning (model.trainable_blocks=k): the patch embedding, position table
    and earlier blocks keep their pretrained values; the last k blocks, the norm and head move."""
    args = _ft_args(tmp_path / "ft", pretrained["mae"], **{"model.trainable_blocks": 1})
    cfg = load_config(FT, args, schema=FinetuneConfig)
    res = run_finetune(cfg)
    assert any("partial fine-tuning: the last 1 blocks" in n for n in res.notes)
    before, _ = ckpt.load_weights(pretrained["mae"] / "encoder.safetensors")
    after, _ = ckpt.load_weights(tmp_path / "ft" / "model_last.safetensors")
    for k in ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.qkv.weight"):
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["blocks.1.attn.qkv.weight"], after["blocks.1.attn.qkv.weight"])
    with pytest.raises(ConfigError, match=r"model.trainable_blocks=3 is not allowed"):
        load_config(FT, [*args, "model.trainable_blocks=3"], schema=FinetuneConfig)


def test_finetuning_with_repeated_augmentation(tmp_path, pretrained):
    args = _ft_args(tmp_path / "ft", pretrained["mae"], **{"train.repeated_aug": 3})
    res = run_finetune(load_config(FT, args, schema=FinetuneConfig))
    assert res.train.step == 16  # 64 images, batch 8, 2 epochs: the epoch keeps its length
    with pytest.raises(ConfigError, match=r"train.repeated_aug=0 is not allowed"):
        load_config(FT, [*args, "train.repeated_aug=0"], schema=FinetuneConfig)


def test_finetune_dry_run_counts_the_labeled_images_and_writes_nothing(
    tmp_path, pretrained, capsys
):
    from mimkit.cli import main

    args = _ft_args(tmp_path / "ft", pretrained["mae"], **{"val_fraction": 0.25})
    assert main(["finetune", "-c", str(FT), *args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 64 labeled images, 2 of each class held out (class-balanced): 44 train, 5 steps of 8
    assert "44 images per epoch, 5 steps per epoch; 10 steps in total (2 epochs)" in out
    assert "FLOP per optimizer step" in out and not (tmp_path / "ft").exists()
