"""``mimkit bench``: FLOP counts checked against hand counts, the comparison's sides, the report
and its JSON, config errors. Tiny models, one or two steps; no assertion on any timing."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mimkit.bench import load_bench_config, run_bench
from mimkit.commands.bench import COMMANDS as BENCH
from mimkit.config import ConfigError, load_config
from mimkit.engine.perf import count_flops
from tests.conftest import DEMO, ROOT, tiny_overrides

BEIT = ROOT / "configs" / "pretrain" / "beit_vit_tiny_fmnist.yaml"
QUICK = {"steps": 1, "warmup": 0, "rounds": 2, "matmul_size": 64}


def mae_cfg(tmp_path, *extra: str):
    return load_bench_config(DEMO, [*tiny_overrides(tmp_path / "run"), *extra])


def beit_overrides(tmp_path) -> list[str]:
    # 6 of 16 patches masked; the recipe's tokenizer file does not exist here
    absent = tmp_path / "absent_tokenizer.safetensors"
    extra = {"mask.num_masked": 6, "mask.min_block": 4, "tokenizer.checkpoint": absent}
    return tiny_overrides(tmp_path / "run", **extra)


def test_flops_of_a_linear_layer_are_the_analytic_count():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    matmul = 2 * 4 * 16 * 8  # 2 FLOPs per multiply-add
    # backward: the weight's gradient only, since x needs none; bias terms are not counted
    assert count_flops(lambda: lin(x).sum().backward()) == 2 * matmul
    x.requires_grad_(True)  # now the input's gradient too
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * matmul


def test_flops_of_attention_on_cpu_are_counted():
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))  # (B, heads, T, head dim)
    expected = 2 * (2 * 2 * 3 * 5 * 5 * 4)  # q @ k^T and attn @ v, 2 * B * heads * T * T * dim
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == expected


def mae_step_flops(b, *, img, patch, chans, dim, depth, dec_dim, dec_depth, ratio, mlp=4):
    """A training step of a ViT MAE by hand: 3x the forward pass (backward = 2x forward), less
    the gradient of the images, which nothing needs."""
    n, p = (img // patch) ** 2, patch * patch * chans
    k = int(n * (1 - ratio))  # visible patches

    def block(t, d):  # qkv, output projection, MLP, q @ k^T and attn @ v
        return 2 * t * d * 3 * d + 2 * t * d * d + 2 * 2 * t * d * mlp * d + 2 * 2 * t * t * d

    forward = (
        2 * n * p * dim  # patch embedding (all patches, before masking)
        + depth * block(k + 1, dim)  # encoder: visible patches + cls
        + 2 * (k + 1) * dim * dec_dim  # decoder embedding
        + dec_depth * block(n + 1, dec_dim)  # decoder: every position + cls
        + 2 * (n + 1) * dec_dim * p  # pixel prediction
    )
    return b * (3 * forward - 2 * n * p * dim)


def test_mae_bench_gives_positive_figures_and_the_hand_counted_flops(tmp_path):
    cfg = mae_cfg(tmp_path)
    r = run_bench(cfg, data_batches=2, **QUICK)
    (t,) = r.train
    assert t.precision == "fp32" and t.batch_size == 8 and r.vocab_size is None
    assert t.images_per_s > 0 and t.step_ms > 0 and t.step_ms_min <= t.step_ms <= t.step_ms_max
    assert t.flops_per_step > 0 and t.achieved_tflops > 0 and t.matmul_peak_tflops > 0
    assert t.mfu == pytest.approx(t.achieved_tflops / t.matmul_peak_tflops)
    assert t.peak_memory_mib >= 0 and t.memory_kind and t.optimizer in ("fused", "foreach")
    assert r.data is not None and r.data.images_per_s > 0 and r.data.batches == 2
    assert r.machine["threads"] == torch.get_num_threads() and r.machine["cpu_count"] >= 1
    m = cfg.model
    hand = mae_step_flops(
        8, img=m.img_size, patch=m.patch_size, chans=m.in_chans, dim=m.embed_dim,
        depth=m.depth, dec_dim=m.decoder.embed_dim, dec_depth=m.decoder.depth,
        ratio=cfg.mask.ratio,
    )  # fmt: skip
    # Attention is ~5% of this model's FLOPs, so a count that misses it fails. The counter also
    # counts the scores recomputed in the attention backward (FlashAttention's, ~1% here).
    assert t.flops_per_step == pytest.approx(hand, rel=0.02)


@pytest.mark.parametrize("method", ["mae", "beit"])
def test_compare_measures_both_sides_and_their_ratio(tmp_path, method):
    if method == "mae":
        cfg = mae_cfg(tmp_path)
    else:
        cfg = load_bench_config(BEIT, beit_overrides(tmp_path))
    r = run_bench(cfg, compare=True, data_batches=0, **QUICK)
    (c,) = r.compare
    sides = {s.name: s for s in c.sides}
    expected = ["mimkit", "hf", "full_sequence"] if method == "mae" else ["mimkit", "hf"]
    assert list(sides) == expected and r.machine["transformers"]
    for s in c.sides:
        assert s.images_per_s > 0 and s.flops_per_step > 0 and len(s.round_images_per_s) == 2
    assert set(c.ratios) == {f"mimkit/{name}" for name in expected[1:]}
    assert all(v > 0 and math.isfinite(v) for v in c.ratios.values())
    if method == "mae":
        # equal sizes: HF's ViTMAE runs the same matmuls; the full sequence runs more
        assert sides["hf"].flops_per_step == sides["mimkit"].flops_per_step
        assert sides["full_sequence"].flops_per_step > sides["mimkit"].flops_per_step
    else:
        assert r.vocab_size == 8192  # the default, with no tokenizer file
        # HF's MIM head scores every position, ours only the masked ones
        assert sides["hf"].flops_per_step > sides["mimkit"].flops_per_step


def test_the_command_prints_the_tables_and_writes_json(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    BENCH[0].register(parser.add_subparsers())
    out = tmp_path / "bench" / "result.json"
    argv = ["bench", "-c", str(DEMO), *tiny_overrides(tmp_path / "run"), "--precision", "both",
            "--steps", "1", "--warmup", "0", "--rounds", "1", "--data-batches", "1",
            "--matmul-size", "64", "--json", str(out)]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "| fp32 | fused | 8 |" in text and "| bf16 | explicit | 8 |" in text  # auto, CPU
    assert "MFU %" in text and "bf16 / fp32 images/s: " in text
    assert "data pipeline alone" in text and str(out) in text
    data = json.loads(out.read_text())
    assert [t["precision"] for t in data["train"]] == ["fp32", "bf16"]
    assert [t["attention"] for t in data["train"]] == ["fused", "explicit"]
    assert all(t["images_per_s"] > 0 and t["flops_per_step"] > 0 for t in data["train"])
    facts = data["machine"]
    assert facts["torch"] == torch.__version__ and facts["device"] == "cpu"
    assert facts["threads"] >= 1 and facts["cpu_count"] >= 1 and facts["device_name"]
    assert data["data"]["images_per_s"] > 0 and data["model"]["embed_dim"] == 32


def test_bad_keys_and_values_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'model\.nope'"):
        mae_cfg(tmp_path, "model.nope=1")
    parser = argparse.ArgumentParser()
    BENCH[0].register(parser.add_subparsers())
    args = parser.parse_args(["bench", "-c", str(DEMO), "train.batch_sise=4"])
    with pytest.raises(ConfigError, match=r"train\.batch_sise"):
        args.func(args)
    with pytest.raises(ConfigError, match="--steps=0"):
        run_bench(mae_cfg(tmp_path), steps=0)
    with pytest.raises(ConfigError, match="precision 'fp16'"):
        run_bench(mae_cfg(tmp_path), precisions=["fp16"])


def test_beit_needs_no_tokenizer_file_but_every_other_check_holds(tmp_path):
    overrides = beit_overrides(tmp_path)
    with pytest.raises(ConfigError, match=r"tokenizer\.checkpoint"):
        load_config(BEIT, overrides)  # pretraining needs the file
    assert load_bench_config(BEIT, overrides).model.method == "beit"  # the benchmark does not
    with pytest.raises(ConfigError, match=r"mask\.num_masked"):
        load_bench_config(BEIT, [*overrides, "mask.num_masked=16"])
    pixels = load_bench_config(BEIT, [*overrides, "target.kind=pixels"])
    with pytest.raises(ConfigError, match="no pixel head"):
        run_bench(pixels, compare=True, **QUICK)


@pytest.mark.slow
def test_the_gpu_check_script_runs_in_its_cpu_smoke_mode(tmp_path):
    """benchmarks/gpu_check.sh --cpu-smoke: every step of the GPU check, tiny, on the CPU; the
    GPU tests are collected (and skipped), and summary.md gathers what was measured."""
    import os
    import subprocess

    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path)}
    script = str(ROOT / "benchmarks" / "gpu_check.sh")
    proc = subprocess.run(["bash", script, "--cpu-smoke"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    status = (tmp_path / "status.txt").read_text()
    steps = ("preflight", "env", "gpu_tests", "bench_mae_vit_base_in1k",
             "bench_beit_vit_base_in1k", "fmnist_run", "bench_fmnist")  # fmt: skip
    for name in steps:
        assert f"{name} rc=0" in status, status
    summary = (tmp_path / "summary.md").read_text()
    assert "HF ViTMAEForPreTraining" in summary and "data pipeline alone" in summary
    assert "skipped" in (tmp_path / "gpu_tests.log").read_text()
