"""``train.attention``: fused (SDPA) or explicit (matmuls + softmax) attention in every timm
attention layer. The two paths must give the same outputs and gradients; ``auto`` picks explicit
only in bf16 on CPU; the trainer and ``mimkit bench`` apply the choice."""

from __future__ import annotations

import pytest
import torch

import mimkit.engine.trainer as trainer_module
from mimkit.bench import load_bench_config, run_bench
from mimkit.config import ConfigError, load_config
from mimkit.models import build_mae
from mimkit.models.attention import fused_attention_wanted, set_attention
from mimkit.models.beit import BEiTEncoder
from mimkit.tasks.pretrain import run_pretrain
from tests.conftest import DEMO, tiny_overrides


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "fused_attn")]


@pytest.mark.parametrize(
    ("mode", "device", "precision", "fused"),
    [
        ("auto", "cpu", "bf16", False),  # the one case where the explicit path is faster
        ("auto", "cpu", "fp32", True),
        ("auto", "cpu", "fp16", True),
        ("auto", "cuda", "bf16", True),
        ("auto", "cuda", "fp32", True),
        ("fused", "cpu", "bf16", True),
        ("explicit", "cuda", "fp32", False),
    ],
)
def test_auto_is_explicit_only_in_bf16_on_cpu(mode, device, precision, fused):
    assert fused_attention_wanted(mode, device_type=device, precision=precision) is fused


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="'flash'"):
        fused_attention_wanted("flash", device_type="cpu", precision="fp32")


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_mae_explicit_and_fused_give_the_same_loss_and_gradients(tiny_cfg):
    cfg = tiny_cfg
    torch.manual_seed(0)
    model = build_mae(cfg).train()
    layers = attention_layers(model)
    assert len(layers) == cfg.model.depth + cfg.model.decoder.depth  # encoder and decoder
    imgs = torch.randn(4, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
    results = {}
    for mode in ("fused", "explicit"):
        assert set_attention(model, mode, device_type="cpu", precision="fp32") == len(layers)
        assert all(m.fused_attn is (mode == "fused") for m in layers)
        model.zero_grad()
        torch.manual_seed(1)  # the same random masks
        loss = model.loss(imgs, model(imgs))
        loss.backward()
        results[mode] = (loss.detach(), _grads(model))
    (la, ga), (lb, gb) = results["fused"], results["explicit"]
    assert torch.allclose(la, lb, atol=1e-6)
    assert ga.keys() == gb.keys() and len(ga) > 10
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("shared", [True, False])
def test_beit_explicit_and_fused_agree_with_relative_position_bias(shared):
    torch.manual_seed(0)
    extra = {"shared_rel_pos_bias": shared, "rel_pos_bias": not shared}
    enc = BEiTEncoder(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, **extra)
    with torch.no_grad():  # a large bias, so a path that dropped it would differ
        for name, p in enc.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape) * 2)
    x = torch.randn(2, 3, 16, 16)
    out = {}
    for mode in ("fused", "explicit"):
        set_attention(enc, mode, device_type="cpu", precision="fp32")
        enc.zero_grad()
        y = enc.forward_features(x)
        y.square().mean().backward()
        out[mode] = (y.detach(), _grads(enc))
    assert torch.allclose(out["fused"][0], out["explicit"][0], atol=1e-5)
    for name, g in out["fused"][1].items():
        assert torch.allclose(g, out["explicit"][1][name], atol=1e-5, rtol=1e-4), name


def test_the_trainer_applies_train_attention(tmp_path, monkeypatch):
    seen = []

    def spy(model, mode, **kw):
        seen.append((model, mode, kw))
        return set_attention(model, mode, **kw)

    monkeypatch.setattr(trainer_module, "set_attention", spy)
    for name, precision in (("bf16", "bf16"), ("fp32", "fp32")):
        args = tiny_overrides(tmp_path / name, **{"train.precision": precision,
                                                  "train.epochs": 1})  # fmt: skip
        run_pretrain(load_config(DEMO, args))
    (m_bf16, mode, kw), (m_fp32, _, kw32) = seen
    assert mode == "auto" and kw == {"device_type": "cpu", "precision": "bf16"}
    assert kw32["precision"] == "fp32"
    assert all(not m.fused_attn for m in attention_layers(m_bf16))  # explicit in bf16 on CPU
    assert all(m.fused_attn for m in attention_layers(m_fp32))


def test_config_names_a_bad_attention_mode(tmp_path):
    args = tiny_overrides(tmp_path)
    with pytest.raises(ConfigError, match=r"train\.attention='flash' is not allowed"):
        load_config(DEMO, [*args, "train.attention=flash"])
    assert load_config(DEMO, [*args, "train.attention=explicit"]).train.attention == "explicit"


def test_bench_reports_the_attention_and_times_hf_eager_too(tmp_path):
    cfg = load_bench_config(DEMO, tiny_overrides(tmp_path / "run"))
    quick = {"steps": 1, "warmup": 0, "rounds": 1, "matmul_size": 64, "data_batches": 0}
    r = run_bench(cfg, precisions=["fp32", "bf16"], compare=True,
                  hf_attention=("sdpa", "eager"), **quick)  # fmt: skip
    assert [t.attention for t in r.train] == ["fused", "explicit"]  # auto on CPU
    for c in r.compare:
        assert [s.name for s in c.sides] == ["mimkit", "hf", "hf_eager", "full_sequence"]
        assert set(c.ratios) == {"mimkit/hf", "mimkit/hf_eager", "mimkit/full_sequence"}
    with pytest.raises(ConfigError, match="--hf-attention 'flash'"):
        run_bench(cfg, compare=True, hf_attention=("flash",), **quick)
