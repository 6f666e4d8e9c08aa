"""Faults injected on purpose: corrupt checkpoints, non-finite steps, fp16 overflow, hostile
configs, and a process killed with SIGKILL at arbitrary moments. Nothing is lost: every run ends
with the weights of an uninterrupted one, or stops with a clear message and its last good
checkpoint intact."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mimkit.config import ConfigError, load_config
from mimkit.engine import checkpoint as ckpt
from mimkit.engine.trainer import NonFiniteLossError
from mimkit.tasks import pretrain as P
from tests.conftest import DEMO, tiny_overrides


def _run(tmp_path, name, resume=False, **extra):
    args = tiny_overrides(tmp_path / name, **{"run.deterministic": True, **extra})
    return P.run_pretrain(load_config(DEMO, args), resume=resume)


def _final(run) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest_checkpoint(run / "checkpoints") / "model.safetensors"))


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- checkpoints: checksums, fallback ----


def test_checkpoints_record_checksums_that_catch_truncation_and_bit_flips(tmp_path):
    ckpt.save_checkpoint(
        tmp_path, 1, weights={"w": torch.arange(1000.0)}, metadata={"method": "mae"},
        train_state={"step": 1},
    )  # fmt: skip
    d = tmp_path / "ckpt-00000001"
    sums = json.loads((d / "checksums.json").read_text())
    assert set(sums) == {"model.safetensors", "state.pt"}
    assert sums["state.pt"]["bytes"] == (d / "state.pt").stat().st_size
    ckpt.verify_checkpoint(d)
    _flip_a_byte(d / "model.safetensors")
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"model\.safetensors: SHA-256"):
        ckpt.verify_checkpoint(d)
    ckpt.verify_checkpoint(d, files=("state.pt",))  # only the files asked for
    (d / "state.pt").write_bytes((d / "state.pt").read_bytes()[:-10])
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"state\.pt: \d+ bytes, \d+ were"):
        ckpt.verify_checkpoint(d, files=("state.pt",))


def test_a_staging_directory_is_never_a_checkpoint(tmp_path):
    """A kill during a save leaves only ``.ckpt-N.tmp``: never resumed from."""
    ckpt.save_checkpoint(tmp_path, 1, weights={"w": torch.ones(2)}, metadata={},
                         train_state={"step": 1})  # fmt: skip
    stage = ckpt.staging_dir(tmp_path, 2)
    (stage / "model.safetensors").write_bytes(b"half")
    (stage / "state.pt").write_bytes(b"half")
    assert [p.name for p in ckpt.checkpoints_newest_first(tmp_path)] == ["ckpt-00000001"]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    straight = tmp_path / "a"
    _run(tmp_path, "a", **{"train.max_steps": 12})
    _run(tmp_path, "b", **{"train.max_steps": 12, "train.ckpt_every_steps": 4})
    run = tmp_path / "b"
    assert [p.name for p in ckpt.checkpoints_newest_first(run / "checkpoints")] == [
        "ckpt-00000012", "ckpt-00000008"]  # fmt: skip
    _flip_a_byte(run / "checkpoints" / "ckpt-00000012" / "model.safetensors")
    res = _run(tmp_path, "b", resume=True, **{"train.max_steps": 12, "train.ckpt_every_steps": 4})
    assert "ckpt-00000012 is unusable" in capsys.readouterr().err
    assert res.train.step == 12
    assert _equal(_final(run), _final(straight))  # retrained 8 -> 12 exactly

    # every checkpoint damaged: a clear error, exit status 3 from the CLI
    for d in ckpt.checkpoints_newest_first(run / "checkpoints"):
        (d / "state.pt").write_bytes(b"")
    with pytest.raises(ckpt.CorruptCheckpointError, match="no usable checkpoint"):
        _run(tmp_path, "b", resume=True, **{"train.max_steps": 12, "train.ckpt_every_steps": 4})
    from mimkit.cli import main

    args = tiny_overrides(run, **{"run.deterministic": True, "train.max_steps": 12,
                                  "train.ckpt_every_steps": 4})  # fmt: skip
    assert main(["pretrain", "-c", str(DEMO), *args, "--resume"]) == 3
    assert "no usable checkpoint" in capsys.readouterr().err


# ---- numerical faults ----


@pytest.fixture
def nan_at_call(monkeypatch):
    """MAE's step returns a NaN loss at its n-th call (1-based)."""
    state = {"n": 0, "at": 3}
    step = P.MAEPretrainTask.step

    def faulty(self, batch):
        out = step(self, batch)
        state["n"] += 1
        return out._replace(loss=out.loss * math.nan) if state["n"] == state["at"] else out

    monkeypatch.setattr(P.MAEPretrainTask, "step", faulty)
    return state


def test_a_non_finite_step_stops_the_run_with_the_last_checkpoint_intact(tmp_path, nan_at_call):
    with pytest.raises(NonFiniteLossError, match=r"at step 2, epoch 0.*train\.on_nonfinite=skip"):
        _run(tmp_path, "s", **{"train.ckpt_every_steps": 1})
    last = ckpt.latest_checkpoint(tmp_path / "s" / "checkpoints")
    assert last.name == "ckpt-00000002"  # the steps before the fault
    assert all(torch.isfinite(t).all() for t in _final(tmp_path / "s").values())


def test_skip_mode_skips_and_counts_a_transient_fault(tmp_path, nan_at_call):
    res = _run(tmp_path, "k", **{"train.on_nonfinite": "skip", "train.max_skipped_steps": 2,
                                 "optim.clip_grad": 1.0})  # fmt: skip
    assert res.train.step == 16 and math.isfinite(res.train.loss)
    state = ckpt.load_train_state(ckpt.latest_checkpoint(tmp_path / "k" / "checkpoints"))
    assert state["skipped_steps"] == 1
    rows = [r for r in _rows(tmp_path / "k") if r["kind"] == "train"]
    assert rows[-1]["skipped_steps"] == 1


def test_skip_mode_stops_after_its_limit(tmp_path):
    with pytest.raises(NonFiniteLossError, match="had skipped 3"):
        _run(tmp_path, "l", **{"train.on_nonfinite": "skip", "train.max_skipped_steps": 3,
                               "optim.lr": 1e30, "optim.warmup_epochs": 0})  # fmt: skip


def test_fp16_with_a_grad_scaler_counts_its_skipped_steps_apart(tmp_path):
    res = _run(tmp_path, "h", **{"train.precision": "fp16", "run.deterministic": False,
                                 "optim.clip_grad": 1.0})  # fmt: skip
    assert res.train.step == 16 and math.isfinite(res.train.loss)
    state = ckpt.load_train_state(ckpt.latest_checkpoint(tmp_path / "h" / "checkpoints"))
    assert state["scaler"]["scale"] > 0 and state["skipped_steps"] == 0
    rows = [r for r in _rows(tmp_path / "h") if r["kind"] == "train"]
    assert rows[-1]["amp_skipped_steps"] == state["amp_skipped_steps"] >= 0
    assert "loss_scale" in rows[-1]


def test_bad_values_of_the_fault_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.on_nonfinite"):
        _run(tmp_path, "v", **{"train.on_nonfinite": "ignore"})
    with pytest.raises(ConfigError, match=r"train\.precision"):
        _run(tmp_path, "v", **{"train.precision": "fp8"})


# ---- hostile input ----


def test_yaml_with_python_tags_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"run: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_config(bad, [])
    assert not marker.exists()


def test_tar_members_that_climb_out_or_link_are_never_read(tmp_path):
    """A hostile shard: ``../`` and absolute names, a symlink and a hard link. Shards are never
    extracted; such members are not read either, and are counted as unsafe."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from mimkit.data.shards import ShardStream

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    shard = tmp_path / "hostile.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("000000.png", "../000001.png", "/tmp/000002.png", "a/../../000003.png"):
            info = tarfile.TarInfo(name)
            info.size = len(png)
            tar.addfile(info, io.BytesIO(png))
        for name, kind in (("000004.png", tarfile.SYMTYPE), ("000005.png", tarfile.LNKTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            tar.addfile(info)
    stream = ShardStream(str(shard), shuffle=False, channels=1)
    got = list(stream)
    assert len(got) == 1 and got[0][0].shape == (1, 8, 8)  # only 000000
    assert stream.skipped["unsafe"] == 5 and stream.skipped["no_image"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.tar"]  # nothing extracted


# ---- SIGKILL ----


def _pretrain_cmd(run) -> list[str]:
    args = tiny_overrides(run, **{"run.deterministic": True, "train.epochs": 3,
                                  "train.ckpt_every_steps": 1, "data.num_workers": 1})  # fmt: skip
    return ["pretrain", "-c", str(DEMO), *args]


def _finetune_cmd(run) -> list[str]:
    from tests.tasks.test_downstream import FT, SCRATCH, _ft_args

    extra = {**SCRATCH, "run.deterministic": True, "train.epochs": 3, "train.ckpt_every_steps": 1,
             "data.num_workers": 1, "model.drop_path": 0.1}  # fmt: skip
    return ["finetune", "-c", str(FT), *_ft_args(run, "none", **extra)]


def _start(cmd: list[str], *extra: str, nproc: int = 1) -> subprocess.Popen:
    launch = [sys.executable, "-m", "mimkit.cli"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  f"--nproc-per-node={nproc}", "-m", "mimkit.cli"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*launch, *cmd, *extra], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip


def _finish(proc: subprocess.Popen) -> None:
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]


def _kill_after(proc: subprocess.Popen, run, step: int) -> None:
    """SIGKILL the run's whole process group (loader workers, torchrun's agent and ranks) once
    checkpoint ``step`` exists: it is then already on its way to the next step or save."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        done = ckpt.latest_checkpoint(run / "checkpoints")
        if done is not None and int(done.name.split("-")[1]) >= step:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize(
    ("kind", "nproc", "kills"),
    [("pretrain", 1, (3, 8, 13)), ("pretrain", 2, (5,)), ("finetune", 1, (3, 8))],
)
def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path, kind, nproc, kills):
    """3 epochs (8 steps each for one process), a checkpoint every step, a loader worker;
    SIGKILLed mid-epoch, at an epoch boundary (step 8) and again, resumed after each kill."""
    make = _pretrain_cmd if kind == "pretrain" else _finetune_cmd
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _finish(_start(make(straight), nproc=nproc))
    for i, step in enumerate(kills):
        _kill_after(_start(make(killed), *(["--resume"] if i else []), nproc=nproc), killed, step)
    _finish(_start(make(killed), "--resume", nproc=nproc))
    assert _equal(_final(killed), _final(straight))
    assert ckpt.latest_checkpoint(killed / "checkpoints").name == (
        ckpt.latest_checkpoint(straight / "checkpoints").name
    )
    assert _logged(killed) == _logged(straight)  # every step logged once


def _logged(run: Path) -> list[tuple[str, int]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"]) for r in rows]


def test_a_resume_drops_the_rows_logged_after_its_checkpoint(tmp_path):
    from mimkit.engine.logging import MetricsLogger

    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in (2, 4, 6):
        log.log({"loss": 1.0}, step=step, prefix="train")
    log.log({"top1": 50.0}, step=6, prefix="eval")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')  # a row cut by the crash
    log.resume_at(4)
    log.log({"loss": 0.9}, step=6, prefix="train")
    assert _logged(tmp_path) == [("train", 2), ("train", 4), ("train", 6)]
