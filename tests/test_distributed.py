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
from tests.test_dense_tasks import fmnist  # noqa: F401  (a fixture: a Fashion-MNIST-like folder)

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not built in"
)

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
    from tests.test_downstream import FT, SCRATCH, _ft_args

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
    from tests.test_downstream import FT, SCRATCH, _ft_args

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "mimkit.cli", "finetune", "-c", str(FT), *_ft_args(tmp_path / "r", "none",
           **SCRATCH), FSDP]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "train.parallel=fsdp" in proc.stderr


def test_commands_not_yet_data_parallel_refuse_torchrun(tmp_path, fmnist):  # noqa: F811
    """Only pretraining and fine-tuning run under torchrun so far; the others say so."""
    from tests.test_dense_tasks import SCRATCH, SEG, _args

    args = _args(tmp_path / "run", fmnist, "null", **{**SCRATCH, "model.depth": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "mimkit.cli", "segment", "-c", str(SEG), *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    msg = "only `mimkit pretrain` and `mimkit finetune` are data-parallel"
    assert proc.returncode != 0 and msg in proc.stderr


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
