from __future__ import annotations

import os
from pathlib import Path

import pytest

from mimkit.config import PretrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
# train.precision=auto (the default) picks bf16 on CPUs with avx512_bf16/AMX: the suite runs in
# fp32 wherever it runs, so that its figures do not depend on the machine (test_precision.py
# checks the detection itself)
os.environ.setdefault("MIMKIT_PRECISION_AUTO", "fp32")
DEMO = ROOT / "configs" / "pretrain" / "mae_vit_tiny_fmnist.yaml"


def tiny_overrides(run_dir: Path, **extra) -> list[str]:
    """A seconds-long MAE run on the synthetic dataset."""
    values = {
        "run.dir": str(run_dir),
        "data.name": "synthetic",
        "data.synthetic_size": 64,
        "model.arch": "custom",
        "model.img_size": 16,
        "model.patch_size": 4,
        "model.in_chans": 3,
        "model.embed_dim": 32,
        "model.depth": 2,
        "model.num_heads": 2,
        "model.decoder.embed_dim": 32,
        "model.decoder.depth": 1,
        "model.decoder.num_heads": 2,
        "optim.warmup_epochs": 1,
        "optim.base_lr": 1e-3,
        "train.epochs": 2,
        "train.batch_size": 8,
        "train.log_every_steps": 2,
        "eval.knn.enabled": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def tiny_cfg(tmp_path) -> PretrainConfig:
    return load_config(DEMO, tiny_overrides(tmp_path / "run"))


# what every mimkit checkpoint records (issue: provenance metadata), by kind
_PROVENANCE = ("format", "mimkit_version", "kind", "method", "img_size", "patch_size", "in_chans",
               "mean", "std", "epochs", "includes_decoder", "created")  # fmt: skip
_PRETRAIN = ("target", "mask_strategy", "mask_ratio", "num_masked", "dataset", "layout",
             "model_config", "step")  # fmt: skip


def assert_provenance(meta: dict, kind: str) -> None:
    """``meta`` holds the provenance a checkpoint of ``kind`` must have, with sensible values."""
    missing = [k for k in _PROVENANCE if k not in meta]
    assert not missing, f"{kind} checkpoint lacks {missing}"
    assert meta["format"] == "mimkit" and meta["kind"] == kind
    assert meta["method"] in ("mae", "beit") and len(meta["mean"]) == meta["in_chans"]
    assert meta["includes_decoder"] is (kind == "pretrain")
    if kind in ("pretrain", "encoder"):
        missing = [k for k in _PRETRAIN if k not in meta]
        assert not missing, f"{kind} checkpoint lacks {missing}"
        assert meta["target"] in ("pixels", "norm_pixels", "visual_tokens")
        if meta["target"] == "visual_tokens":
            assert meta["vocab_size"] > 0 and meta["tokenizer"]["checkpoint"]
    else:  # downstream: what it was initialized from
        assert isinstance(meta["pretrain"], dict)
