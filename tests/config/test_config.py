import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mimkit.config import ConfigError, load_config
from tests.conftest import DEMO, ROOT, tiny_overrides

RECIPES = sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_pretraining_recipe_loads(recipe, tmp_path):
    tok = tmp_path / "tokenizer.safetensors"
    tok.touch()
    (tmp_path / "image.png").touch()  # a folder recipe needs an image in data.root
    args = [f"data.root={tmp_path}", f"run.dir={tmp_path / 'r'}", f"tokenizer.checkpoint={tok}"]
    cfg = load_config(recipe, args)
    assert cfg.optim.lr > 0 and cfg.model.embed_dim % cfg.model.num_heads == 0


def test_beit_paper_recipes(tmp_path):
    tok = tmp_path / "t.safetensors"
    tok.touch()
    for size, scale, clip in (("base", 0.1, 3.0), ("large", 1e-5, 1.0)):  # Table 5
        cfg = load_config(
            ROOT / f"configs/pretrain/beit_vit_{size}_in1k.yaml",
            ["data.root=/", f"tokenizer.checkpoint={tok}"],
        )
        assert cfg.train.batch_size * cfg.optim.accum_steps == 2048 and cfg.optim.lr == 1.5e-3
        assert (
            cfg.optim.min_lr == 1e-5 and cfg.optim.warmup_epochs == 10 and cfg.train.epochs == 800
        )
        assert cfg.optim.clip_grad == clip and cfg.model.drop_path == 0.1
        assert cfg.model.layer_scale == scale and cfg.optim.betas == [0.9, 0.999]
        assert cfg.mask.num_masked == 75 and cfg.mask.strategy == "blockwise"
        assert cfg.tokenizer.img_size == 112 and cfg.model.rel_pos_bias == "shared"


def test_tokenizer_recipe_loads(tmp_path):
    from mimkit.config import TokenizerConfig

    cfg = load_config(ROOT / "configs/tokenizer/dvae_fmnist.yaml", [f"data.root={tmp_path}"],
                      schema=TokenizerConfig)  # fmt: skip
    assert cfg.tokenizer.img_size // cfg.tokenizer.downsample == 7


def test_mae_paper_recipes():
    cfg = load_config(ROOT / "configs/pretrain/mae_vit_large_in1k.yaml", ["data.root=/"])
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads) == (1024, 24, 16)
    eff = cfg.train.batch_size * cfg.optim.accum_steps
    assert eff == 4096
    assert cfg.optim.lr == pytest.approx(1.5e-4 * 4096 / 256)
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.weight_decay == 0.05
    assert cfg.optim.warmup_epochs == 40 and cfg.mask.ratio == 0.75 and cfg.target.norm_pix
    assert (cfg.model.decoder.depth, cfg.model.decoder.embed_dim) == (8, 512)
    huge = load_config(ROOT / "configs/pretrain/mae_vit_huge_in1k.yaml", ["data.root=/"])
    assert huge.model.patch_size == 14 and huge.model.embed_dim == 1280


def test_overrides_and_derived_lr(tmp_path):
    cfg = load_config(DEMO, tiny_overrides(tmp_path, **{"optim.lr": 0.01}))
    assert cfg.optim.lr == 0.01
    cfg = load_config(DEMO, tiny_overrides(tmp_path, **{"optim.accum_steps": 4}))
    assert cfg.optim.lr == pytest.approx(1e-3 * 8 * 4 / 256)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("mask.ratio=1.0", "mask.ratio=1.0 is not allowed: must be in the open interval (0, 1)"),
        ("mask.ratio=0", "mask.ratio=0.0 is not allowed"),
        (
            "model.img_size=30",
            "model.img_size=30 is not allowed: must be divisible by model.patch_size=4",
        ),
        (
            "model.embed_dim=33",
            "model.embed_dim=33 is not allowed: must be divisible by model.num_heads=2",
        ),
        ("optim.lr=-1", "optim.lr=-1.0 is not allowed: must be a positive number"),
        ("optim.base_lr=0", "optim.base_lr=0.0 is not allowed"),
        ("train.batch_size=0", "train.batch_size=0 is not allowed: must be a positive number"),
        ("train.foo=1", "unknown key 'train.foo'"),
        ("trian.epochs=1", "unknown key 'trian"),
        ("train.epochs=abc", "bad value for 'train.epochs'"),
        ("data.name=folder", "data.root="),
        ("train.precision=fp8", "train.precision='fp8' is not allowed"),
        ("train.epochs", "is not of the form key.sub=value"),
    ],
)
def test_bad_values_name_key_value_and_rule(tmp_path, override, needle):
    args = tiny_overrides(tmp_path)
    if override.startswith("data.name=folder"):
        args += ["data.root=/does/not/exist"]
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [*args, override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_data_path_and_file_errors(tmp_path):
    with pytest.raises(
        ConfigError, match=r"data.root='/nope' is not allowed: the path does not exist"
    ):
        load_config(DEMO, ["data.root=/nope"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+, column \d+: malformed YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  widht: 3\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: unknown key 'model.widht'"):
        load_config(unknown)
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("run: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(tagged)


def test_resolved_config_round_trips(tmp_path, tiny_cfg):
    from mimkit.config import save_config

    save_config(tiny_cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == tiny_cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["optim"]["lr"] == tiny_cfg.optim.lr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train.foo=1"], "unknown key 'train.foo'"),
        (["data.root=/missing/path"], "data.root='/missing/path' is not allowed"),
        (["mask.ratio=2"], "mask.ratio=2.0 is not allowed"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(tmp_path, args, needle):
    proc = subprocess.run(
        [sys.executable, "-m", "mimkit.cli", "pretrain", "-c", str(DEMO), *args],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr
    assert not (Path(tmp_path) / "runs").exists()  # nothing was started


def test_cli_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mimkit.cli", "pretrain", "-c", str(bad)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "malformed YAML" in proc.stderr


def test_the_global_batch_sets_accumulation_and_lr_for_any_number_of_processes(monkeypatch):
    mae = ROOT / "configs/pretrain/mae_vit_base_in1k.yaml"
    for procs, accum in ((1, 64), (8, 8), (64, 1)):
        monkeypatch.setenv("WORLD_SIZE", str(procs))
        cfg = load_config(mae, ["data.root=/"])
        assert cfg.train.global_batch_size == 4096 and cfg.optim.accum_steps == accum
        assert cfg.optim.lr == pytest.approx(1.5e-4 * 4096 / 256)  # the paper's, every time
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"train.global_batch_size=4096 is not a multiple of "
                       r"train.batch_size=64 x 3 processes = 192"):  # fmt: skip
        load_config(mae, ["data.root=/"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"optim.accum_steps=4 contradicts"):
        load_config(mae, ["data.root=/", "optim.accum_steps=4"])
    with pytest.raises(ConfigError, match=r"train.global_batch_size=0 is not allowed"):
        load_config(mae, ["data.root=/", "train.global_batch_size=0"])
    # a recipe without it keeps its meaning: batch_size x accum_steps x processes
    cfg = load_config(DEMO, ["optim.accum_steps=2"])
    assert cfg.train.global_batch_size is None and cfg.optim.accum_steps == 2


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_pretraining_recipe_builds_at_its_real_size(recipe, tmp_path):
    """--dry-run's plan: the recipe's model on the meta device (no memory), its FLOPs per step;
    the MAE encoders have exactly timm's parameter count for the same ViT (an independent
    oracle)."""
    import timm
    import torch

    from mimkit.tasks.dryrun import pretrain_plan

    tok = tmp_path / "tokenizer.safetensors"
    tok.touch()
    (tmp_path / "image.png").touch()
    cfg = load_config(recipe, [f"data.root={tmp_path}", f"tokenizer.checkpoint={tok}"])
    plan = pretrain_plan(cfg)
    assert plan.params > plan.encoder_params > 0 and plan.flops_per_step > 0
    assert plan.global_batch == cfg.train.batch_size * cfg.optim.accum_steps
    m = cfg.model
    if (
        m.method == "mae"
        and m.arch != "custom"
        and m.depth == {"vit_tiny": 12}.get(m.arch, m.depth)
    ):
        name = f"{m.arch}_patch{m.patch_size}_{m.img_size}"
        with torch.device("meta"):
            ref = timm.create_model(name, pretrained=False, num_classes=0, in_chans=m.in_chans)
        assert plan.encoder_params == sum(p.numel() for p in ref.parameters())


def test_pretrain_dry_run_describes_the_run_and_writes_nothing(tmp_path, capsys):
    from mimkit.cli import main

    run = tmp_path / "r"
    assert main(["pretrain", "-c", str(DEMO), f"run.dir={run}", "--dry-run",
                 "train.global_batch_size=512", "train.batch_size=128"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "global batch 512 = batch_size 128 (1 process) x accum_steps 4" in out
    assert "60,000 images per epoch, 117 steps per epoch; 234 steps in total" in out
    assert "FLOP per optimizer step" in out and "optim:" in out  # the resolved config too
    assert not run.exists()


FT_RECIPES = sorted((ROOT / "configs" / "finetune").glob("*.yaml"))
# the pretraining recipe whose encoder each fine-tuning recipe's model.init stands for
_INIT_ARCH = {"mae_vit_base": "mae_vit_base_in1k", "mae_vit_large": "mae_vit_large_in1k",
              "mae_vit_huge": "mae_vit_huge_in1k", "beit_base": "beit_vit_base_in1k",
              "beit_large": "beit_vit_large_in1k", "fmnist": "mae_vit_tiny_fmnist"}  # fmt: skip


@pytest.mark.parametrize("recipe", FT_RECIPES, ids=lambda p: p.name)
def test_every_finetuning_recipe_builds_at_its_real_size(recipe, tmp_path):
    """Each fine-tuning recipe loads, and --dry-run's plan builds its classifier at its real size
    on the meta device: model.init is a weights file with only the provenance of the
    pretraining recipe it names (no tensors), the data a folder of 2 classes."""
    import numpy as np
    import torch
    from PIL import Image

    from mimkit.config import to_dict
    from mimkit.config.downstream import FinetuneConfig
    from mimkit.engine.checkpoint import save_weights
    from mimkit.tasks.dryrun import finetune_plan

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / split / c / f"{i}.png")
    args = [f"data.root={tmp_path / 'train'}", f"data.eval_root={tmp_path / 'val'}",
            "data.name=folder", "data.num_workers=0", f"run.dir={tmp_path / 'r'}"]  # fmt: skip
    raw = yaml.safe_load(recipe.read_text())
    if raw["model"].get("init"):
        key = next(k for k in _INIT_ARCH if k in recipe.name)
        pre_args = [f"data.root={tmp_path / 'train'}", f"tokenizer.checkpoint={recipe}"]
        pre = load_config(ROOT / "configs" / "pretrain" / f"{_INIT_ARCH[key]}.yaml", pre_args)
        init = tmp_path / "init.safetensors"
        meta = {"format": "mimkit", "model_config": to_dict(pre.model)}
        save_weights(init, {"stub": torch.zeros(1)}, metadata=meta)
        args.append(f"model.init={init}")
    cfg = load_config(recipe, args, schema=FinetuneConfig)
    plan = finetune_plan(cfg)
    # 8 labeled images; a validation split holds one of each class out
    assert plan.params > 0 and plan.flops_per_step > 0
    assert plan.images == (8 if cfg.val_fraction == 0 else 6)
    if cfg.train.global_batch_size:
        assert plan.global_batch == cfg.train.global_batch_size


@pytest.mark.slow
def test_the_mae_base_recipe_takes_a_real_optimizer_step(tmp_path):
    """The ImageNet MAE ViT-B/16 recipe at its real size (224 px, decoder 8 x 512), one
    optimizer step on synthetic images on the CPU: the model, masking, loss, AdamW and the
    checkpoint all work at that size."""
    import math

    from mimkit.tasks.pretrain import run_pretrain

    args = [f"run.dir={tmp_path / 'r'}", "data.name=synthetic", "data.synthetic_size=4",
            "data.num_workers=0", "train.global_batch_size=null", "train.batch_size=2",
            "train.max_steps=1", "eval.knn.enabled=false", "train.precision=fp32"]  # fmt: skip
    res = run_pretrain(load_config(ROOT / "configs" / "pretrain" / "mae_vit_base_in1k.yaml", args))
    assert res.train.step == 1 and math.isfinite(res.train.loss)


def test_the_imagenet_linear_probe_recipe_loads_and_builds_at_its_real_size(tmp_path):
    """MAE's linear probe of ViT-B on ImageNet (A.3): LARS, base lr 0.1 x 16384 / 256, 90
    epochs, the cls token; its encoder built on the meta device has timm's ViT-B size."""
    import timm
    import torch

    from mimkit.config import to_dict
    from mimkit.config.downstream import LinprobeConfig
    from mimkit.engine.checkpoint import save_weights
    from mimkit.models import build_encoder

    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "a" / "0.png").touch()
    (tmp_path / "img.png").touch()
    pre = load_config(ROOT / "configs/pretrain/mae_vit_base_in1k.yaml", [f"data.root={tmp_path}"])
    init = tmp_path / "init.safetensors"
    save_weights(init, {"stub": torch.zeros(1)},
                 metadata={"format": "mimkit", "model_config": to_dict(pre.model)})  # fmt: skip
    cfg = load_config(ROOT / "configs/linprobe/mae_vit_base_in1k.yaml",
                      [f"data.root={tmp_path / 'train'}", f"data.eval_root={tmp_path / 'val'}",
                       f"model.init={init}"], schema=LinprobeConfig)  # fmt: skip
    p = cfg.probe
    assert (p.optimizer, p.epochs, p.batch_size, p.pool) == ("lars", 90, 16384, "cls")
    with torch.device("meta"):
        enc = build_encoder(cfg.model.model_config(), fixed_pos_embed=False, mask_token=False)
        ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    assert sum(x.numel() for x in enc.parameters()) == sum(x.numel() for x in ref.parameters())


def test_choices_are_literal_types_checked_in_yaml_overrides_and_python(tmp_path):
    from mimkit.config import validate
    from mimkit.config.downstream import LinprobeConfig

    with pytest.raises(ConfigError, match=r"^override 'mask.strategy': mask.strategy='chess' is "
                       r"not allowed: one of \['random', 'blockwise', 'grid'\]$"):  # fmt: skip
        load_config(DEMO, ["mask.strategy=chess"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  parallel: horovod\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.parallel='horovod' is not allowed"):
        load_config(bad)
    cfg = load_config(DEMO, tiny_overrides(tmp_path / "r"))
    cfg.train.on_nonfinite = "ignore"  # a config changed in Python is checked by validate()
    with pytest.raises(ConfigError, match=r"train\.on_nonfinite='ignore' is not allowed"):
        validate(cfg)
    probe = LinprobeConfig()
    probe.probe.pool = "max"
    with pytest.raises(ConfigError, match=r"probe\.pool='max' is not allowed: one of \['avg'"):
        probe.validate()


def test_finetunings_older_eval_spelling_still_works_with_a_warning(capsys):
    from mimkit.config import core
    from mimkit.config.downstream import FinetuneConfig

    core._SAID.clear()  # said once per process
    recipe = ROOT / "configs/finetune/fmnist_vit_tiny.yaml"
    scratch = ["model.init=null", "model.method=mae", "model.arch=vit_tiny", "model.img_size=28",
               "model.patch_size=4", "model.in_chans=1"]  # fmt: skip
    old = load_config(recipe, [*scratch, "eval_every_epochs=3", "eval_every_steps=7"],
                      schema=FinetuneConfig)  # fmt: skip
    new = load_config(recipe, [*scratch, "eval.every_epochs=3", "eval.every_steps=7"],
                      schema=FinetuneConfig)  # fmt: skip
    assert old == new and (new.eval.every_epochs, new.eval.every_steps) == (3, 7)
    assert "eval_every_epochs is deprecated, use eval.every_epochs" in capsys.readouterr().err
