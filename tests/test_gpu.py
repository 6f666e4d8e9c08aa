"""CUDA checks (``-m gpu``; skipped without a GPU, so CI never runs them): the paths a GPU takes
and a CPU does not. ``benchmarks/gpu_check.sh`` runs them first on a lent GPU machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mimkit.config import load_config
from tests.conftest import DEMO, tiny_overrides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _tiny(run, **extra):
    return tiny_overrides(run, **{"run.device": "cuda", "data.num_workers": 1, **extra})


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_pretraining_steps_on_cuda(tmp_path, precision):
    from mimkit.tasks.pretrain import run_pretrain

    res = run_pretrain(load_config(DEMO, _tiny(tmp_path, **{"train.precision": precision})))
    assert res.train.step == 16 and math.isfinite(res.train.loss)
    last = [r for r in _rows(tmp_path) if r["kind"] == "train"][-1]
    if precision == "fp16":  # the GradScaler ran and says how many steps it skipped
        assert last["loss_scale"] > 0 and "amp_skipped_steps" in last


def test_adamw_is_fused_on_cuda_and_steps():
    from mimkit.engine.optim import adamw, param_groups

    model = torch.nn.Linear(8, 8).cuda()
    opt, kind = adamw(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    assert kind == "fused"
    before = model.weight.detach().clone()
    model(torch.randn(4, 8, device="cuda")).square().mean().backward()
    opt.step()
    assert not torch.equal(before, model.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_and_explicit_attention_agree_on_cuda(dtype):
    from mimkit.config import load_config as load
    from mimkit.models import build_encoder
    from mimkit.models.attention import set_attention

    torch.manual_seed(0)
    enc = build_encoder(load(DEMO).model, fixed_pos_embed=False, mask_token=False).cuda().eval()
    x = torch.randn(4, 1, 28, 28, device="cuda")
    outs = []
    for mode in ("fused", "explicit"):
        set_attention(enc, mode, device_type="cuda", precision="fp32")
        with torch.no_grad(), torch.autocast("cuda", dtype, enabled=dtype != torch.float32):
            outs.append(enc.forward_features(x).float())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)


def test_a_compiled_pretraining_on_cuda(tmp_path):
    from mimkit.tasks.pretrain import run_pretrain

    cfg = load_config(DEMO, _tiny(tmp_path, **{"train.compile": True, "train.max_steps": 4,
                                               "train.precision": "bf16"}))  # fmt: skip
    res = run_pretrain(cfg)
    assert res.train.step == 4 and math.isfinite(res.train.loss)


def test_the_loader_pins_memory_on_cuda():
    from mimkit.data import SyntheticImages, make_loader

    loader = make_loader(SyntheticImages(16, img_size=16), batch_size=4,
                         sampler=torch.utils.data.SequentialSampler(range(16)),
                         num_workers=1, drop_last=True)  # fmt: skip
    assert loader.pin_memory
    imgs, _ = next(iter(loader))
    assert imgs.is_pinned()


def test_resume_on_cuda_is_exact_in_deterministic_mode(tmp_path):
    """Straight vs stopped at step 5 and resumed, in fresh processes (cuBLAS's workspace is
    fixed by the run, as deterministic mode needs)."""
    from mimkit.engine import checkpoint as ckpt

    def run(d, *extra):
        args = ["pretrain", "-c", str(DEMO), *_tiny(d, **{"run.deterministic": True}), *extra]
        proc = subprocess.run([sys.executable, "-m", "mimkit.cli", *args], capture_output=True,
                              text=True, env=dict(os.environ), timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]

    run(tmp_path / "a")
    run(tmp_path / "b", "train.max_steps=5")
    run(tmp_path / "b", "--resume")
    a = ckpt.load_weights(tmp_path / "a" / "encoder.safetensors")[0]
    b = ckpt.load_weights(tmp_path / "b" / "encoder.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
