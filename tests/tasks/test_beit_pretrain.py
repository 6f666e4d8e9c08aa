"""BEiT end to end on tiny synthetic data: tokenizer training, MIM pretraining, ablations."""

import contextlib
import json

import pytest
import torch

from mimkit.config import ConfigError, TokenizerConfig, load_config
from mimkit.engine import checkpoint as ckpt
from mimkit.tasks.pretrain import run_pretrain
from mimkit.tasks.tokenizer import run_tokenizer
from tests.conftest import ROOT, assert_provenance, tiny_overrides

BEIT = ROOT / "configs" / "pretrain" / "beit_vit_tiny_fmnist.yaml"
DVAE = ROOT / "configs" / "tokenizer" / "dvae_fmnist.yaml"


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    run = tmp_path_factory.mktemp("tok")
    args = [
        f"run.dir={run}", "data.name=synthetic", "data.synthetic_size=64", "tokenizer.img_size=16",
        "tokenizer.in_chans=3", "tokenizer.vocab_size=32", "tokenizer.hidden_dim=8",
        "tokenizer.codebook_dim=8", "tokenizer.downsample=4", "train.batch_size=16",
        "train.epochs=1", "eval.samples=16", "optim.warmup_epochs=0",
    ]  # fmt: skip
    res = run_tokenizer(load_config(DVAE, args, schema=TokenizerConfig))
    assert (
        res.tokenizer_path.is_file()
        and (run / "figures" / "tokenizer_reconstruction.png").is_file()
    )
    assert {"psnr", "psnr_floor", "perplexity", "codes_used"} <= set(res.metrics)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" and "psnr" in r for r in rows)
    meta = ckpt.read_metadata(res.tokenizer_path)
    assert meta["kind"] == "dvae" and meta["grid"] == [4, 4] and meta["vocab_size"] == 32
    return res.tokenizer_path


def _beit(tmp_path, tokenizer_path, **extra):
    values = {
        "model.method": "beit",
        "mask.strategy": "blockwise",
        "mask.num_masked": 6,
        "mask.min_block": 2,
        "target.kind": "tokens",
        "tokenizer.checkpoint": str(tokenizer_path),
        "train.epochs": 1,
        **extra,
    }
    args = [a for a in tiny_overrides(tmp_path / "run") if not a.startswith("train.epochs")]
    return load_config(BEIT, args + [f"{k}={v}" for k, v in values.items()])


def test_beit_pretraining_run(tmp_path, tokenizer_path):
    res = run_pretrain(
        _beit(tmp_path, tokenizer_path, **{"eval.knn.enabled": True, "eval.knn.k": 5})
    )
    run = tmp_path / "run"
    assert res.train.step == 8 and (run / "figures" / "beit_predictions.png").is_file()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    accs = [r["mim_acc"] for r in rows if r["kind"] == "train"]
    assert accs and all(0 <= a <= 1 for a in accs)
    weights, meta = ckpt.load_weights(
        ckpt.latest_checkpoint(run / "checkpoints") / "model.safetensors"
    )
    assert (
        "mask_token" in weights
        and "lm_head.weight" in weights
        and "rel_pos_bias.relative_position_bias_table" in weights
    )
    assert (
        meta["method"] == "beit" and meta["target"] == "visual_tokens" and meta["vocab_size"] == 32
    )
    assert_provenance(meta, "pretrain")
    enc, enc_meta = ckpt.load_weights(run / "encoder.safetensors")
    assert_provenance(enc_meta, "encoder")
    assert enc_meta["target"] == "visual_tokens" and enc_meta["vocab_size"] == 32
    assert "mask_token" not in enc and "lm_head.weight" not in enc  # a timm Beit state dict
    assert set(res.knn) == {"pretrained", "random_init", "raw_pixels"}


@pytest.mark.parametrize(
    "switch",
    [
        {"mask.strategy": "random"},
        {"target.kind": "pixels", "target.norm_pix": True},
        {"target.loss_on": "all"},
        {"model.rel_pos_bias": "none", "model.abs_pos_emb": True, "model.layer_scale": "null"},
    ],
    ids=["random-masking", "pixel-target", "loss-on-all", "abs-pos-no-layer-scale"],
)
def test_every_ablation_switch_trains(tmp_path, tokenizer_path, switch):
    res = run_pretrain(_beit(tmp_path, tokenizer_path, **{"train.max_steps": 2, **switch}))
    assert res.train.step == 2 and torch.isfinite(torch.tensor(res.train.loss))


def test_beit_config_errors(tmp_path, tokenizer_path):
    with pytest.raises(ConfigError, match=r"tokenizer\.checkpoint=None is not allowed"):
        _beit(tmp_path, tokenizer_path, **{"tokenizer.checkpoint": "null"})
    with pytest.raises(ConfigError, match=r"mask\.strategy='chess' is not allowed"):
        load_config(ROOT / "configs/pretrain/mae_vit_tiny_fmnist.yaml",
                    [*tiny_overrides(tmp_path), "mask.strategy=chess"])  # fmt: skip
    with pytest.raises(ConfigError, match="token grid"):
        run_pretrain(
            _beit(tmp_path, tokenizer_path, **{"model.patch_size": 8, "mask.num_masked": 2})
        )


def test_beit_exact_resume(tmp_path, tokenizer_path):
    def run(name, resume=False, **extra):
        cfg = _beit(tmp_path / name, tokenizer_path, **{"run.deterministic": True, **extra})
        return run_pretrain(cfg, resume=resume)

    run("a", **{"train.max_steps": 7})
    run("b", **{"train.max_steps": 3})
    run("b", resume=True, **{"train.max_steps": 7})
    a, b = (
        ckpt.load_weights(
            ckpt.latest_checkpoint(tmp_path / n / "run" / "checkpoints") / "model.safetensors"
        )[0]
        for n in ("a", "b")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_token_cache_gives_the_same_run_for_fixed_views(tmp_path, tokenizer_path):
    fixed = {
        "data.crop_scale": "[1.0,1.0]",
        "data.hflip": 0,
        "tokenizer.color_jitter": 0,
        "train.max_steps": 4,
        "run.deterministic": True,
    }
    plain = run_pretrain(_beit(tmp_path / "plain", tokenizer_path, **fixed))
    cached = run_pretrain(
        _beit(tmp_path / "cached", tokenizer_path, **fixed, **{"tokenizer.cache": True})
    )
    assert plain.train.loss == cached.train.loss
    a, b = (
        ckpt.load_weights(tmp_path / n / "run" / "encoder.safetensors")[0]
        for n in ("plain", "cached")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="needs fixed views"):
        _beit(tmp_path, tokenizer_path, **{"tokenizer.cache": True})


@pytest.mark.parametrize("method", ["beit", "mae", "mae_blockwise"])
def test_the_training_step_never_waits_for_the_device(
    tmp_path, tokenizer_path, monkeypatch, method
):
    """Forward + backward read nothing back from the device; an optimizer step reads one value,
    the finite check agreed across ranks (counted with the ops that stall a CUDA stream)."""
    from mimkit.engine import trainer as T
    from mimkit.engine.perf import host_syncs

    micro, opt = [], []
    real_micro, real_opt = T.Trainer._micro_step, T.Trainer._optimizer_step

    @contextlib.contextmanager
    def micro_step(self, sync):
        with real_micro(self, sync), host_syncs() as counts:
            yield
        micro.append(counts)

    def optimizer_step(self, loss):
        with host_syncs() as counts:
            out = real_opt(self, loss)
        opt.append(counts)
        return out

    monkeypatch.setattr(T.Trainer, "_micro_step", micro_step)
    monkeypatch.setattr(T.Trainer, "_optimizer_step", optimizer_step)
    if method == "beit":
        cfg = _beit(tmp_path, tokenizer_path, **{"optim.clip_grad": 1.0})
    else:  # MAE with its own random masks, or with blockwise masks from the pipeline
        extra = {"mask.strategy": "blockwise", "mask.min_block": 2} if "block" in method else {}
        cfg = load_config(ROOT / "configs/pretrain/mae_vit_tiny_fmnist.yaml", tiny_overrides(
            tmp_path / "run", **{"train.epochs": 1, "optim.clip_grad": 1.0, **extra}))  # fmt: skip
    assert run_pretrain(cfg).train.step == 8
    assert len(micro) == 8 and all(c == {} for c in micro), micro
    assert len(opt) == 8 and all(c == {"_local_scalar_dense": 1} for c in opt), opt
    # the detector does see a boolean index and a read value
    with host_syncs() as counts:
        x = torch.arange(4.0)
        float(x[x > 1].sum())
    assert counts == {"index[bool]": 1, "_local_scalar_dense": 1}


def test_visualize_predictions_of_a_beit_run(tmp_path, tokenizer_path, capsys):
    from PIL import Image

    from mimkit.cli import main

    run_pretrain(_beit(tmp_path, tokenizer_path, **{"train.max_steps": 2}))
    png, out = tmp_path / "x.png", tmp_path / "pred.png"
    pixels = torch.randint(0, 256, (16, 16, 3), generator=torch.Generator().manual_seed(0))
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(png)
    argv = ["visualize", "predictions", str(tmp_path / "run"), str(png), "--out", str(out)]
    assert main(argv) == 0 and out.is_file() and f"wrote {out}" in capsys.readouterr().out
    # the tokenizer given by hand must predict the same vocabulary
    from mimkit.models.tokenizer import DiscreteVAE

    other = tmp_path / "other.safetensors"
    meta = {**ckpt.read_metadata(tokenizer_path), "vocab_size": 64}
    keys = ("in_chans", "vocab_size", "hidden_dim", "codebook_dim", "downsample")
    ckpt.save_weights(other, DiscreteVAE(**{k: meta[k] for k in keys}).state_dict(), meta)
    assert main([*argv, "--tokenizer", str(other)]) == 2
    assert "64 tokens, the BEiT predicts 32" in capsys.readouterr().err
    # pixel-regressing BEiTs and MAEs predict no tokens: one line, exit status 2
    run_pretrain(_beit(tmp_path / "px", tokenizer_path,
                       **{"train.max_steps": 1, "target.kind": "pixels"}))  # fmt: skip
    assert main(["visualize", "predictions", str(tmp_path / "px" / "run"), str(png)]) == 2
    assert "predicts no visual tokens" in capsys.readouterr().err


def test_mae_with_visual_token_targets_pretrains(tmp_path, tokenizer_path):
    """MAE Table 1d ("dVAE token"): the MAE decoder predicts the tokenizer's tokens."""
    values = {"target.kind": "tokens", "tokenizer.checkpoint": str(tokenizer_path),
              "train.max_steps": 2, "eval.health.knn_train": 0}  # fmt: skip
    run = tmp_path / "run"
    res = run_pretrain(load_config(ROOT / "configs/pretrain/mae_vit_tiny_fmnist.yaml",
                                   tiny_overrides(run, **values)))  # fmt: skip
    assert res.train.step == 2 and torch.isfinite(torch.tensor(res.train.loss))
    meta = ckpt.read_metadata(res.encoder_path)
    assert meta["method"] == "mae" and meta["target"] == "visual_tokens"
    assert meta["vocab_size"] == 32 and meta["tokenizer"]["kind"] == "dvae"
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    weights, _ = ckpt.load_weights(latest / "model.safetensors")
    assert weights["decoder_pred.weight"].shape[0] == 32  # a vocabulary head
    health = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
              if "health_loss" in x]  # fmt: skip
    assert health and health[-1]["health_loss"] > 0
