import json
import math

import pytest
import torch
from safetensors.torch import load_file

from mimkit.config import load_config
from mimkit.engine import checkpoint as ckpt
from mimkit.engine.optim import cosine_lr, param_groups
from mimkit.models import build_mae
from mimkit.tasks.pretrain import run_pretrain
from tests.conftest import DEMO, assert_provenance, tiny_overrides


def test_cosine_schedule():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert cosine_lr(0, **kw) == 0.0
    assert cosine_lr(5, **kw) == 0.5
    assert cosine_lr(10, **kw) == 1.0
    assert cosine_lr(60, **kw) == pytest.approx(0.55)
    assert cosine_lr(110, **kw) == pytest.approx(0.1)
    assert cosine_lr(500, **kw) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_embeddings_and_tokens(tiny_cfg):
    model = build_mae(tiny_cfg)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"encoder.cls_token", "mask_token", "encoder.norm.weight", "decoder_pred.bias"} <= exempt
    assert all(n.endswith("weight") and "norm" not in n for n in decayed)
    assert "encoder.blocks.0.attn.qkv.weight" in decayed
    all_names = exempt | decayed
    assert "encoder.pos_embed" not in all_names  # frozen sin-cos
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


def test_checkpoint_atomic_layout_and_rotation(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(
            tmp_path, step, weights={"w": torch.full((2,), float(step))},
            metadata={"method": "mae", "step": step}, train_state={"step": step}, keep_last=2,
        )  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-00000002", "ckpt-00000003"]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "ckpt-00000003"
    weights, meta = ckpt.load_weights(latest / "model.safetensors")
    assert weights["w"][0] == 3 and meta == {"method": "mae", "step": 3}
    assert ckpt.load_train_state(latest) == {"step": 3}
    assert not list(tmp_path.glob(".*tmp*"))


def _train_losses(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _run(tmp_path, name, resume=False, **extra):
    args = tiny_overrides(tmp_path / name, **{"run.deterministic": True, **extra})
    return run_pretrain(load_config(DEMO, args), resume=resume)


def test_exact_resume_is_bitwise(tmp_path):
    # 2 epochs x 8 steps; the stop falls mid-epoch (step 5) and the schedule follows train.epochs
    straight = _run(tmp_path, "a", **{"train.max_steps": 12})
    _run(tmp_path, "b", **{"train.max_steps": 5})
    resumed = _run(tmp_path, "b", resume=True, **{"train.max_steps": 12})
    assert straight.train.step == resumed.train.step == 12
    a = load_file(str(ckpt.latest_checkpoint(tmp_path / "a" / "checkpoints") / "model.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(tmp_path / "b" / "checkpoints") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = ckpt.load_train_state(ckpt.latest_checkpoint(tmp_path / "a" / "checkpoints"))
    sb = ckpt.load_train_state(ckpt.latest_checkpoint(tmp_path / "b" / "checkpoints"))
    for x, y in zip(
        sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(x["exp_avg"], y["exp_avg"]) and torch.equal(
            x["exp_avg_sq"], y["exp_avg_sq"]
        )
    # losses logged after the resume equal the straight run's at the same steps
    la, lb = (_train_losses(tmp_path / n / "metrics.jsonl") for n in ("a", "b"))
    assert set(la) <= set(lb) and all(la[s] == lb[s] for s in la)  # b also logged its stop (5)


def test_resume_refuses_changed_config_and_fresh_run_refuses_existing(tmp_path):
    from mimkit.config import ConfigError

    _run(tmp_path, "c", **{"train.max_steps": 2})
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        _run(tmp_path, "c", **{"train.max_steps": 2})
    with pytest.raises(ConfigError, match=r"optim\.base_lr"):
        _run(tmp_path, "c", resume=True, **{"optim.base_lr": 0.5})
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        _run(tmp_path, "d", resume=True)


def test_a_run_saved_before_a_key_existed_resumes(tmp_path):
    """A config.yaml written by an older mimkit lacks newer keys: the run had their defaults.
    Compiling (or not) may change on resume: the same maths and state_dict keys."""
    import yaml

    _run(tmp_path, "old", **{"train.max_steps": 2})
    path = tmp_path / "old" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    for key in ("compile", "compile_mode", "compile_backend"):
        del saved["train"][key]
    path.write_text(yaml.safe_dump(saved))
    res = _run(tmp_path, "old", resume=True, **{"train.max_steps": 3, "train.compile": True,
                                                 "train.compile_backend": "eager"})  # fmt: skip
    assert res.train.step == 3


def test_run_directory_contract(tmp_path):
    res = _run(tmp_path, "e", **{"eval.knn.enabled": True, "eval.knn.k": 5})
    run = tmp_path / "e"
    assert (run / "config.yaml").is_file() and (run / "figures" / "reconstruction.png").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "eval"} <= {r["kind"] for r in rows}
    assert all(math.isfinite(r["loss"]) for r in rows if r["kind"] == "train")
    meta = ckpt.read_metadata(run / "encoder.safetensors")
    assert (
        meta["method"] == "mae" and meta["target"] == "norm_pixels" and meta["mask_ratio"] == 0.75
    )
    assert meta["img_size"] == 16 and meta["patch_size"] == 4 and meta["includes_decoder"] is False
    assert len(meta["mean"]) == 3 and meta["step"] == res.train.step == 16
    full = ckpt.read_metadata(ckpt.latest_checkpoint(run / "checkpoints") / "model.safetensors")
    assert_provenance(meta, "encoder")
    assert_provenance(full, "pretrain")
    assert full["includes_decoder"] is True and full["step"] == 16
    assert set(res.knn) == {"pretrained", "random_init", "raw_pixels"}
    assert json.loads((run / "eval.json").read_text())["knn"]["pretrained"]["k"] == 5


def test_non_finite_loss_stops_before_the_step(tmp_path):
    from mimkit.engine.trainer import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        _run(tmp_path, "f", **{"optim.lr": 1e30, "optim.warmup_epochs": 0})


def test_gradient_accumulation_matches_the_full_batch(tiny_cfg):
    from mimkit.engine.task import StepOutput

    torch.manual_seed(0)
    model = build_mae(tiny_cfg)
    x, noise = torch.randn(8, 3, 16, 16), torch.rand(8, 16)

    def grads(chunks):
        model.zero_grad()
        for xs, ns in zip(x.chunk(chunks), noise.chunk(chunks), strict=True):
            out = model(xs, noise=ns)
            StepOutput(model.loss(xs, out), {}).loss.div(chunks).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for a, b in zip(grads(1), grads(2), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_accumulation_bf16_drop_path_and_clipping_run(tmp_path):
    res = _run(
        tmp_path,
        "g",
        **{
            "optim.accum_steps": 2,
            "train.precision": "bf16",
            "model.drop_path": 0.1,
            "optim.clip_grad": 1.0,
            "run.deterministic": False,
        },
    )
    assert res.train.step == 2 * (64 // 16)  # 2 epochs of 4 optimizer steps
    assert math.isfinite(res.train.loss)


def test_pretrain_on_an_image_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(16):
        arr = (torch.rand(20 + i, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i}.png")
    res = _run(tmp_path, "h", **{"data.name": "folder", "data.root": str(folder)})
    assert res.train.step == 4 and (tmp_path / "h" / "encoder.safetensors").is_file()


def test_mae_with_blockwise_masks_from_the_pipeline(tmp_path):
    res = _run(tmp_path, "k", **{"mask.strategy": "blockwise", "mask.min_block": 2})
    assert res.train.step == 16 and math.isfinite(res.train.loss)


def test_progress_says_how_far_a_phase_is_when_not_on_a_terminal(capsys):
    from mimkit.engine.progress import progress

    assert list(progress(range(3), desc="k-NN: test features", every_s=0.0)) == [0, 1, 2]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("k-NN: test features: 1/3 batches")
    assert lines[-1].startswith("k-NN: test features: done, 3 batches in")
    assert list(progress(iter([1]), desc="quick")) == [1]  # a short phase stays quiet
    assert capsys.readouterr().out == ""


# ---- the evaluation hook ----


def _evaluator(tmp_path, scores, **spec):
    from mimkit.engine.evaluation import Evaluation, Evaluator

    it, logged = iter(scores), []
    evaluation = Evaluation(evaluate=lambda model: next(it), **spec)
    return Evaluator(evaluation, tmp_path, lambda rec, step: logged.append(step)), logged


def test_evaluation_cadence_by_epochs_and_steps(tmp_path):
    ev, _ = _evaluator(tmp_path, [], metric="top1", every_epochs=2, every_steps=3)
    assert [e for e in range(1, 6) if ev.due_after_epoch(e, final=False)] == [2, 4]
    assert ev.due_after_epoch(5, final=True)
    # the last step is the last epoch's evaluation
    assert [s for s in range(1, 10) if ev.due_after_step(s, total_steps=9)] == [3, 6]


def test_evaluation_keeps_last_and_best_and_chooses_the_best_again_on_resume(tmp_path):
    model = torch.nn.Linear(2, 1)
    scores = [{"loss": 2.0}, {"loss": None}, {"loss": 1.0}, {"loss": 1.0}, {"loss": 9.0}]
    ev, logged = _evaluator(tmp_path, scores, metric="loss", mode="min")
    for step in (1, 2, 3, 4, 4):  # the second evaluation of step 4 is not done
        ev.run(model, step=step, epoch=step, metadata={"kind": "test"})
    assert logged == [1, 2, 3, 4]
    # lower is better, a missing score never wins, a tie keeps the earlier
    assert ev.best == {"step": 3, "epoch": 3, "loss": 1.0}
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == {"history": ev.history, "best": ev.best} and len(saved["history"]) == 4
    assert ckpt.read_metadata(tmp_path / "model_best.safetensors")["step"] == 3
    assert ckpt.read_metadata(tmp_path / "model_last.safetensors")["step"] == 4
    resumed, _ = _evaluator(tmp_path, [], metric="loss", mode="min")
    resumed.restore(2)  # the checkpoint of step 2: later evaluations are done again
    assert [h["step"] for h in resumed.history] == [1, 2] and resumed.best["step"] == 1


def test_evaluation_chooses_between_the_model_and_its_ema(tmp_path):
    model, ema = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    scores = [{"top1": 50.0, "top5": 90.0, "ema_top1": 60.0, "ema_top5": 95.0}]
    ev, _ = _evaluator(tmp_path, scores, metric="top1", rivals={"ema": ema},
                       best_keys=("top5",), info={"selection": "val"})  # fmt: skip
    ev.run(model, step=8, epoch=1, metadata={})
    assert ev.best == {"epoch": 1, "step": 8, "top1": 60.0, "which": "ema", "top5": 95.0}
    best, meta = ckpt.load_weights(tmp_path / "model_best.safetensors")
    assert meta["which"] == "ema" and torch.equal(best["weight"], ema.weight.detach())
    assert json.loads((tmp_path / "eval.json").read_text())["selection"] == "val"
