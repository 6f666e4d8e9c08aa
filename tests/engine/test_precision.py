"""train.precision=auto: bf16 where the device computes it natively, fp32 elsewhere."""

from __future__ import annotations

import pytest
import yaml

from mimkit.config import ConfigError, PretrainConfig, core, load_config
from tests.conftest import DEMO, tiny_overrides


def test_default_is_auto_and_resolves_when_loaded(monkeypatch):
    assert PretrainConfig().train.precision == "auto"
    monkeypatch.setenv("MIMKIT_PRECISION_AUTO", "bf16")
    assert load_config(DEMO).train.precision == "bf16"
    monkeypatch.setenv("MIMKIT_PRECISION_AUTO", "fp32")
    assert load_config(DEMO).train.precision == "fp32"
    # an explicit value is kept whatever the machine
    assert load_config(DEMO, ["train.precision=bf16"]).train.precision == "bf16"


def test_bad_forced_value_is_a_config_error(monkeypatch):
    monkeypatch.setenv("MIMKIT_PRECISION_AUTO", "fp8")
    with pytest.raises(ConfigError, match="MIMKIT_PRECISION_AUTO='fp8'"):
        load_config(DEMO)


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu avx2 avx512f avx512_bf16 sse", True),  # AMD Zen 4 / Intel Cooper Lake
        ("fpu avx2 avx512f amx_bf16 amx_tile", True),  # Intel Sapphire Rapids
        ("fpu avx2 avx512f avx512bw", False),  # Skylake: emulated bf16 is slower than fp32
    ],
)
def test_cpu_detection_reads_the_flags(monkeypatch, flags, native):
    monkeypatch.setattr(core, "cpu_flags", lambda: set(flags.split()))
    got, why = core.native_bf16("cpu")
    assert got is native and "bf16" in why
    monkeypatch.delenv("MIMKIT_PRECISION_AUTO")
    cfg = load_config(DEMO, ["run.device=cpu"])
    assert cfg.train.precision == ("bf16" if native else "fp32")


def test_cpu_flags_parser(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: a avx512_bf16 b\n\nprocessor\t: 1\nflags : x\n")
    assert core.cpu_flags(info) == {"a", "avx512_bf16", "b"}
    assert core.cpu_flags(tmp_path / "missing") is None


def test_run_saves_and_prints_the_resolved_precision(tmp_path, monkeypatch, capsys):
    from mimkit.tasks.pretrain import run_pretrain

    monkeypatch.setenv("MIMKIT_PRECISION_AUTO", "bf16")
    cfg = load_config(DEMO, tiny_overrides(tmp_path / "r", **{"train.epochs": 1}))
    run_pretrain(cfg)
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["train"]["precision"] == "bf16"
    assert "precision bf16" in capsys.readouterr().out


def test_config_built_in_python_resolves_at_run_start(tmp_path, monkeypatch):
    from mimkit.engine.rundir import prepare_run

    monkeypatch.setenv("MIMKIT_PRECISION_AUTO", "bf16")
    cfg = PretrainConfig()
    cfg.run.dir = str(tmp_path / "p")
    prepare_run(cfg, resume=False)
    assert cfg.train.precision == "bf16"
    saved = yaml.safe_load((tmp_path / "p" / "config.yaml").read_text())
    assert saved["train"]["precision"] == "bf16"


# ---- the frozen-feature paths (linear probe, k-NN): probe.precision / knn.precision ----


def test_feature_precision_auto_resolves_per_command(monkeypatch):
    from mimkit.config.downstream import KnnCommandConfig, LinprobeConfig
    from tests.conftest import ROOT

    scratch = ["model.init=null", "model.method=mae", "model.arch=vit_tiny", "model.img_size=28",
               "model.patch_size=4", "model.in_chans=1", "model.depth=2"]  # fmt: skip
    lp, kn = (
        ROOT / "configs/linprobe/fmnist_vit_tiny.yaml",
        ROOT / "configs/knn/fmnist_vit_tiny.yaml",
    )
    for value in ("bf16", "fp32"):
        monkeypatch.setenv("MIMKIT_PRECISION_AUTO", value)
        assert load_config(lp, scratch, schema=LinprobeConfig).probe.precision == value
        assert load_config(kn, scratch, schema=KnnCommandConfig).knn.precision == value
    assert load_config(kn, [*scratch, "knn.precision=fp32"], schema=KnnCommandConfig)
    with pytest.raises(ConfigError, match=r"knn\.precision='fp8'"):
        load_config(kn, [*scratch, "knn.precision=fp8"], schema=KnnCommandConfig)
    with pytest.raises(ConfigError, match=r"probe\.precision='half'"):
        load_config(lp, [*scratch, "probe.precision=half"], schema=LinprobeConfig)


def test_bf16_features_match_fp32_and_leave_the_encoder_as_it_was():
    import torch

    from mimkit.config import ModelConfig
    from mimkit.data import SyntheticImages
    from mimkit.models import build_encoder
    from mimkit.tasks.knn import extract_features
    from mimkit.tasks.linprobe import block_features

    torch.manual_seed(0)
    cfg = ModelConfig(method="mae", arch="custom", img_size=16, patch_size=4, in_chans=3,
                      embed_dim=32, depth=2, num_heads=2)  # fmt: skip
    enc = build_encoder(cfg, fixed_pos_embed=False, mask_token=False)
    ds = [(img.float() / 255, y) for img, y in SyntheticImages(size=24, img_size=16)]
    f32, y32 = extract_features(enc, ds, batch_size=8)
    f16, y16 = extract_features(enc, ds, batch_size=8, precision="bf16")
    assert f16.dtype == torch.float32 and torch.equal(y32, y16)
    cos = torch.nn.functional.cosine_similarity(f32, f16, dim=-1)
    assert cos.min() > 0.99 and not torch.equal(f32, f16)  # bf16 really ran
    assert all(m.fused_attn for m in enc.modules() if hasattr(m, "fused_attn"))  # restored
    b32, _ = block_features(enc, ds, layers=[0, 1], pool="avg", batch_size=8)
    b16, _ = block_features(enc, ds, layers=[0, 1], pool="avg", batch_size=8, precision="bf16")
    assert torch.nn.functional.cosine_similarity(b32, b16, dim=-1).min() > 0.99
    # features are ordinary tensors: a probe trains on them
    w = torch.zeros(32, 10, requires_grad=True)
    (b16[1] @ w).sum().backward()
    assert w.grad is not None
