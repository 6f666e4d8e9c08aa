"""Multi-process training under torchrun (2 CPU processes, gloo): DDP equals one process.

A global batch of 8 as 2 ranks x 4 must train like one process with a batch of 8: the same
samples (the sampler splits one permutation), the same augmentations and masks (seeded per
sample: MAE with the pipeline's blockwise masks), gradients averaged by DDP. Resuming a 2-process
run gives the weights of an uninterrupted one, and checkpoints and logs are written once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mimkit.engine import checkpoint as ckpt
from tests.conftest import DEMO, tiny_overrides
from tests.tasks.test_dense_tasks import fmnist  # noqa: F401  (a fixture: a Fashion-MNIST-like folder)

pytestmark = [
    pytest.mark.slow,  # processes started by torchrun
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not built in"
    ),
]

MASKS = ["mask.strategy=blockwise", "mask.num_masked=10", "mask.min_block=2"]


def _mimkit(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "mimkit.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "mimkit.cli", *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _pretrain(run, *extra: str, nproc: int = 1, batch: int = 8, resume: bool = False):
    args = ["pretrain", "-c", str(DEMO), *tiny_overrides(run), *MASKS, f"train.batch_size={batch}"]
    return _mimkit([*args, *extra, *(["--resume"] if resume else [])], nproc)


def _losses(run) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def _weights(run) -> dict[str, torch.Tensor]:
    return ckpt.load_weights(run / "encoder.safetensors")[0]


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _pretrain(one, batch=8)
    _pretrain(two, batch=4, nproc=2)
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 8  # 16 steps, logged every 2: the rows are written once
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    wa, wb = _weights(one), _weights(two)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    # rank 0 alone wrote: one checkpoint per epoch (2), one metrics file, one config
    names = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert names == ["ckpt-00000008", "ckpt-00000016", "latest"], names
    state = ckpt.load_train_state(two / "checkpoints" / "ckpt-00000016")
    assert state["world_size"] == 2 and len(state["rng"]) == 2


def test_a_two_process_run_resumes_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    _pretrain(straight, batch=4, nproc=2)
    _pretrain(split, "train.max_steps=5", batch=4, nproc=2)  # stops mid-epoch
    assert "ckpt-00000005" in {p.name for p in (split / "checkpoints").iterdir()}
    _pretrain(split, batch=4, nproc=2, resume=True)
    wa, wb = _weights(straight), _weights(split)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _losses(split)[-1] == _losses(straight)[-1]


def test_resuming_with_another_number_of_processes_is_refused(tmp_path):
    run = tmp_path / "r"
    _pretrain(run, "train.max_steps=3", batch=4, nproc=2)
    args = ["pretrain", "-c", str(DEMO), *tiny_overrides(run), *MASKS, "train.batch_size=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mimkit.cli", *args, "--resume"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "the same number of processes" in proc.stderr  # via the lr
    # an absolute lr does not tell: the checkpoint's record of the processes does
    fixed = tmp_path / "fixed"
    _pretrain(fixed, "train.max_steps=3", "optim.lr=3e-5", batch=4, nproc=2)
    args = ["pretrain", "-c", str(DEMO), *tiny_overrides(fixed), *MASKS, "train.batch_size=4"]
    cmd = [sys.executable, "-m", "mimkit.cli", *args, "optim.lr=3e-5", "--resume"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "written by 2 process(es)" in proc.stderr, proc.stderr


def test_a_worker_restarted_by_torchrun_resumes_by_itself(tmp_path):
    """torchrun --max-restarts starts the same command again, with TORCHELASTIC_RESTART_COUNT."""
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    _pretrain(straight)
    _pretrain(restarted, "train.max_steps=5")  # the first attempt "fails" after step 5
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHELASTIC_RESTART_COUNT": "1"}
    args = ["pretrain", "-c", str(DEMO), *tiny_overrides(restarted), *MASKS, "train.batch_size=8"]
    proc = subprocess.run([sys.executable, "-m", "mimkit.cli", *args], capture_output=True,
                          text=True, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    wa, wb = _weights(straight), _weights(restarted)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_processes_stream_shards(tmp_path):
    """data.name=shards under torchrun: each rank streams its half; the run completes."""
    import numpy as np
    from PIL import Image

    from mimkit.data.shards import write_shards

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(32):
        img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / "images" / f"{i:02d}.png")
    shards = write_shards(tmp_path / "images", tmp_path / "shards", shard_size=5)
    run = tmp_path / "run"
    extra = [f"data.root={shards}", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"]
    args = [a for a in tiny_overrides(run) if not a.startswith("data.")]
    _mimkit(["pretrain", "-c", str(DEMO), *args, "data.name=shards", *extra, *MASKS,
             "train.batch_size=4"], nproc=2)  # fmt: skip
    assert len(_losses(run)) == 4  # 2 epochs x (16 samples per rank / 4) steps, every 2nd logged
    assert (run / "encoder.safetensors").is_file()


def _finetune(run, *extra: str, nproc: int = 1, batch: int = 8):
    from tests.tasks.test_downstream import FT, SCRATCH, _ft_args

    # per-sample randomness only (seeded augmentations); Mixup pairs and drop path are drawn
    # per rank, so they are off for the comparison with one process
    same = {**SCRATCH, "aug.mixup": 0, "aug.cutmix": 0, "model.drop_path": 0,
            "train.batch_size": batch, "data.eval_max_samples": 16}  # fmt: skip
    return _mimkit(["finetune", "-c", str(FT), *_ft_args(run, "none", **same), *extra], nproc)


def test_finetuning_on_two_processes_equals_one_with_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _finetune(one, batch=8)
    proc = _finetune(two, batch=4, nproc=2)
    assert proc.stdout.count("eval epoch 2 ") == 1  # rank 0 alone evaluates and reports
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) > 0
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    wa = ckpt.load_weights(one / "model_last.safetensors")[0]
    wb = ckpt.load_weights(two / "model_last.safetensors")[0]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    ea, eb = (json.loads((r / "eval.json").read_text())["best"] for r in (one, two))
    assert eb["top1"] == pytest.approx(ea["top1"])


def test_finetuning_refuses_fsdp(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from tests.tasks.test_downstream import FT, SCRATCH, _ft_args

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "mimkit.cli", "finetune", "-c", str(FT), *_ft_args(tmp_path / "r", "none",
           **SCRATCH), FSDP]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "train.parallel=fsdp" in proc.stderr


def test_frozen_feature_commands_refuse_torchrun(tmp_path):
    """k-NN and the linear probe read a frozen encoder's features in one process; under
    torchrun they say so instead of hanging."""
    from tests.tasks.test_downstream import KNN, SCRATCH

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    scratch = [f"{k}={v}" for k, v in SCRATCH.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "mimkit.cli", "knn", "-c", str(KNN), f"run.dir={tmp_path / 'run'}",
           "model.init=null", "data.name=synthetic", *scratch]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "mimkit knn runs in one process" in proc.stderr


def _dense(command: str, run, root, *extra: str, nproc: int = 2):
    from tests.tasks.test_dense_tasks import DET, SCRATCH, SEG, _args

    values = {**SCRATCH, "model.depth": 2, "train.batch_size": 2}  # per process: 2 x 2 = 4
    config = SEG if command == "segment" else DET
    return _mimkit([command, "-c", str(config), *_args(run, root, "null", **values), *extra], nproc)


@pytest.mark.parametrize("command", ["segment", "detect"])
def test_dense_tasks_train_on_two_processes_and_resume(tmp_path, fmnist, command):  # noqa: F811
    """Segmentation (SETR-PUP, BatchNorm in its head) and detection (Mask R-CNN) under torchrun:
    rank 0 alone evaluates, reports and writes; a run stopped by train.max_steps resumes on two
    processes to the end. 16 canvases, 4 per optimizer step: 4 steps per epoch."""
    run = tmp_path / "run"
    first = _dense(command, run, fmnist, "train.max_steps=4")
    out = first.stdout
    assert out.count("eval epoch 1 ") == 1 and out.count("run directory:") == 1
    if command == "segment":  # torch syncs BatchNorm on accelerators only: the log says so
        assert out.count("BatchNorm statistics per process (2 on CPU") == 1
    second = _dense(command, run, fmnist, "train.max_steps=null", "--resume")
    assert second.stdout.count("eval epoch 2 ") == 1
    saved = json.loads((run / "eval.json").read_text())
    assert [h["step"] for h in saved["history"]] == [4, 8]
    metric = "mIoU" if command == "segment" else "box_map"
    assert all(h[metric] is None or h[metric] >= 0 for h in saved["history"])
    weights, meta = ckpt.load_weights(run / "model_last.safetensors")
    assert meta["step"] == 8 and not any(k.startswith("module.") for k in weights)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("ckpt"))
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in train if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # rows written once, by rank 0


def test_dense_tasks_refuse_fsdp(tmp_path, fmnist):  # noqa: F811
    from tests.tasks.test_dense_tasks import SCRATCH, SEG, _args

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = _args(tmp_path / "r", fmnist, "null", **SCRATCH)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "mimkit.cli", "segment", "-c", str(SEG), *args, FSDP]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "mimkit segment is data-parallel with DDP" in proc.stderr


def test_tokenizer_trains_on_two_processes(tmp_path):
    """The dVAE under torchrun: rank 0 alone evaluates and writes the tokenizer."""
    from tests.tasks.test_beit_pretrain import DVAE

    run = tmp_path / "tok"
    args = [
        f"run.dir={run}", "data.name=synthetic", "data.synthetic_size=64", "tokenizer.img_size=16",
        "tokenizer.in_chans=3", "tokenizer.vocab_size=32", "tokenizer.hidden_dim=8",
        "tokenizer.codebook_dim=8", "tokenizer.downsample=4", "train.batch_size=8",
        "train.epochs=1", "eval.samples=16", "optim.warmup_epochs=0", "train.log_every_steps=1",
    ]  # fmt: skip
    proc = _mimkit(["tokenizer", "train", "-c", str(DVAE), *args], nproc=2)
    assert proc.stdout.count("tokenizer:  ") == 1
    meta = ckpt.read_metadata(run / "tokenizer.safetensors")
    assert meta["kind"] == "dvae" and meta["step"] == 4  # 64 images, 2 x 8 per step
    assert json.loads((run / "eval.json").read_text())["tokenizer"]["num_images"] == 16


FSDP = "train.parallel=fsdp"


def test_fsdp_trains_like_one_process_and_resumes_exactly(tmp_path):
    """FSDP2 over 2 ranks x 4 equals one process x 8; its checkpoint (full weights from rank 0,
    the optimizer's shards written by both ranks with torch.distributed.checkpoint) resumes to
    the bitwise weights of an uninterrupted FSDP run."""
    one, two, split = tmp_path / "one", tmp_path / "two", tmp_path / "split"
    _pretrain(one, batch=8)
    _pretrain(two, FSDP, batch=4, nproc=2)
    a, b = _losses(one), _losses(two)
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    wa, wb = _weights(one), _weights(two)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    last = two / "checkpoints" / "ckpt-00000016"
    shards = sorted(p.name for p in (last / "optimizer").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards
    state = ckpt.load_train_state(last)
    assert "optimizer" not in state and state["parallel"] == "fsdp" and len(state["rng"]) == 2
    full = ckpt.load_weights(last / "model.safetensors")[0]  # whole tensors, not shards
    assert full["cls_token"].shape == (1, 1, 32), full["cls_token"].shape
    assert not list((two / "checkpoints").glob(".*tmp"))

    _pretrain(split, FSDP, "train.max_steps=5", batch=4, nproc=2)  # stops mid-epoch
    _pretrain(split, FSDP, batch=4, nproc=2, resume=True)
    wc = _weights(split)
    assert all(torch.equal(wb[k], wc[k]) for k in wb)
    assert _losses(split)[-1] == _losses(two)[-1]


def test_a_ddp_checkpoint_is_not_resumed_under_fsdp(tmp_path):
    run = tmp_path / "r"
    _pretrain(run, "train.max_steps=3", batch=4, nproc=2)
    args = ["pretrain", "-c", str(DEMO), *tiny_overrides(run), *MASKS, "train.batch_size=4", FSDP]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "mimkit.cli", *args, "--resume"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "train.parallel='fsdp' differs from the run's saved value 'ddp'" in proc.stderr


def test_segmentation_batchnorm_is_synchronized_on_gpus_only(monkeypatch):
    """Several ranks on GPUs: every BatchNorm becomes SyncBatchNorm with the same state-dict
    keys (checkpoints load in one process); on CPU or alone the model is left as it is."""
    from mimkit.engine.distributed import sync_batchnorm
    from mimkit.models.segmentation import SetrPUPHead

    def head():
        torch.manual_seed(0)
        return SetrPUPHead(8, 3, channels=8, upsample=4)

    keys = set(head().state_dict())
    monkeypatch.setenv("WORLD_SIZE", "1")
    model, note = sync_batchnorm(head(), torch.device("cuda"))
    assert note is None and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    monkeypatch.setenv("WORLD_SIZE", "2")
    model, note = sync_batchnorm(head(), torch.device("cpu"))
    assert "per process" in note
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    model, note = sync_batchnorm(head(), torch.device("cuda"))  # converting needs no GPU
    synced = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert len(synced) == 2 and "SyncBatchNorm" in note and set(model.state_dict()) == keys


def test_a_global_batch_recipe_runs_unchanged_on_one_or_two_processes(tmp_path):
    """train.global_batch_size=8 with train.batch_size=4: 2 accumulation steps on one process,
    none on two; the same lr and, after 16 steps, the same weights."""
    import yaml

    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("train.global_batch_size=8", "train.epochs=1")
    _pretrain(one, *extra, batch=4)
    _pretrain(two, *extra, batch=4, nproc=2)
    c1, c2 = (yaml.safe_load((r / "config.yaml").read_text()) for r in (one, two))
    assert (c1["optim"]["accum_steps"], c2["optim"]["accum_steps"]) == (2, 1)
    assert c1["optim"]["lr"] == c2["optim"]["lr"] == pytest.approx(1e-3 * 8 / 256)
    assert c1["train"]["global_batch_size"] == c2["train"]["global_batch_size"] == 8
    torch.testing.assert_close(torch.tensor(_losses(two)), torch.tensor(_losses(one)),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    wa, wb = _weights(one), _weights(two)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
