"""mimkit study: a grid of cells, resumable, with its table and plots (tiny, CPU, subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mimkit.cli import main
from mimkit.config import ConfigError
from mimkit.study import load_study, plan, run_study
from tests.conftest import DEMO, ROOT

pytestmark = pytest.mark.slow  # studies of real runs, killed and resumed

FT = ROOT / "configs" / "finetune" / "fmnist_vit_tiny.yaml"
KNN = ROOT / "configs" / "knn" / "fmnist_vit_tiny.yaml"
ARCH = ["model.arch=custom", "model.img_size=16", "model.patch_size=4", "model.in_chans=3",
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2"]  # fmt: skip


def _study(tmp_path: Path, **extra) -> Path:
    """2 variants x 2 seeds of a seconds-long MAE, fine-tuned at one fraction; scratch with its
    own lr chosen from two on validation."""
    doc = {
        "name": "tiny",
        "out": str(tmp_path / "runs"),
        "results": str(tmp_path / "results"),
        "seeds": [0, 1],
        "common": ["data.name=synthetic", "data.synthetic_size=64", "data.num_workers=0"],
        "pretrain": {
            "config": str(DEMO),
            "overrides": [
                *ARCH,
                "model.decoder.embed_dim=32",
                "model.decoder.depth=1",
                "model.decoder.num_heads=2",
                "train.steps=4",
                "train.batch_size=16",
                "eval.knn.enabled=false",
                "train.log_every_steps=2",
            ],
        },
        "variants": [
            {"name": "r50", "overrides": ["mask.ratio=0.5"], "x": 0.5},
            {"name": "r75", "overrides": ["mask.ratio=0.75"], "x": 0.75},
        ],
        "scratch": {
            "enabled": True,
            "overrides": ["model.method=mae", *ARCH],
            "finetune_overrides": ["optim.layer_decay=1.0"],
            "lr_grid": [1e-3, 1e-2],
        },
        "finetune": {
            "enabled": True,
            "config": str(FT),
            "overrides": [
                "data.eval_max_samples=20",
                "train.batch_size=8",
                "train.log_every_steps=2",
                "optim.warmup_epochs=0",
            ],
            "label_fractions": [1.0],
            "per_fraction": {"1.0": ["train.steps=4", "eval_every_steps=2"]},
        },
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_plan_lists_every_cell_with_its_dependencies(tmp_path):
    cfg = load_study(_study(tmp_path))
    ids = [c.id for c in plan(cfg)]
    assert ids[:2] == ["pretrain/r50_s0", "finetune/r50_f1_s0"]
    assert {"lr_search/scratch_lr0.001_f1_s0", "lr_search/scratch_lr0.01_f1_s0"} <= set(ids)
    scratch = next(c for c in plan(cfg) if c.id == "finetune/scratch_f1_s1")
    assert set(scratch.deps) == {
        "lr_search/scratch_lr0.001_f1_s0",
        "lr_search/scratch_lr0.01_f1_s0",
    }
    assert len(ids) == 4 + 4 + 2 + 2  # pretrain, finetune, lr search, scratch finetune


def test_tiny_study_runs_resumes_and_reports(tmp_path, capsys):
    path = _study(tmp_path)
    assert main(["study", "-c", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "12 cells, 0 done" in out and "mimkit pretrain -c" in out
    assert main(["study", "-c", str(path), "--jobs", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    results = tmp_path / "results"
    cells = sorted(p.name for p in (results / "cells").glob("*.json"))
    assert len(cells) == 12
    for name in ("table.md", "table.json", "accuracy.png", "curves.png"):
        assert (results / name).is_file(), name
    table = json.loads((results / "table.json").read_text())
    r50 = table["rows"]["r50"]["finetune_f1"]
    assert r50["n"] == 2 and r50["seeds"] == [0, 1] and 0 <= r50["mean"] <= 100
    assert table["rows"]["scratch"]["finetune_f1"]["n"] == 2
    assert set(table["minus_scratch"]["r75"]["finetune_f1"]) >= {"mean", "std", "wins", "n"}
    search = table["scratch_lr_search"]["1"]
    assert set(search["tried"]) == {"0.001", "0.01"}
    # the scratch baseline fine-tunes with the lr that won on validation (a tie: the first)
    chosen = search["chosen"]
    assert search["tried"][f"{chosen:g}"] == max(search["tried"].values())
    rec = json.loads((results / "cells" / "finetune__scratch_f1_s1.json").read_text())
    assert rec["lr"] == pytest.approx(chosen) and f"optim.lr={chosen}" in rec["command"]
    ft = json.loads((results / "cells" / "finetune__r50_f1_s0.json").read_text())
    assert ft["metrics"]["selected_on"] == "val" and ft["metrics"]["curve"]
    assert "runs/pretrain/r50_s0" in ft["command"] and ft["seconds"] > 0
    md = (results / "table.md").read_text()
    assert "| r50 |" in md and "(2)" in md and "paired by seed" in md
    # a second invocation recomputes nothing
    before = {p.name: p.stat().st_mtime_ns for p in (results / "cells").glob("*.json")}
    assert main(["study", "-c", str(path)]) == 0
    assert "12 done, 0 to run" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in (results / "cells").glob("*.json")}
    assert before == after


def test_killed_study_continues_without_recomputing(tmp_path):
    path = _study(tmp_path, scratch={"enabled": False},
                  finetune={"enabled": False}, knn={"enabled": True, "config": str(KNN),
                  "overrides": ["data.eval_max_samples=20", *[]]})  # fmt: skip
    cells_dir = tmp_path / "results" / "cells"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mimkit.cli", "study", "-c", str(path), "--jobs", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and not any(cells_dir.glob("*.json")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the study and the cell it is running
    proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in cells_dir.glob("*.json")}
    assert 1 <= len(first) < 8, first
    res = run_study(load_study(path), jobs=2, threads=1)
    assert not res.failed and len(res.results) == 8
    for name, mtime in first.items():  # finished cells were read back, not recomputed
        assert (cells_dir / name).stat().st_mtime_ns == mtime
    table = json.loads((tmp_path / "results" / "table.json").read_text())
    assert table["rows"]["r75"]["knn"]["n"] == 2 and "knn" in table["raw_pixels"]
    # run directories are not committed: a cell to run whose pretraining's weights are gone
    # has that pretraining run again; the other results are kept
    import shutil

    shutil.rmtree(tmp_path / "runs" / "pretrain" / "r50_s0")
    (cells_dir / "knn__r50_s0.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in cells_dir.glob("*.json")}
    res = run_study(load_study(path), jobs=1, threads=1)
    assert (
        not res.failed
        and (tmp_path / "runs" / "pretrain" / "r50_s0" / "encoder.safetensors").is_file()
    )
    for name, mtime in kept.items():
        changed = (cells_dir / name).stat().st_mtime_ns != mtime
        assert changed == (name == "pretrain__r50_s0.json"), name


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"seeds": []}, "seeds"),
        ({"variants": [{"name": "a b"}]}, r"variants\[0\].name"),
        ({"variants": [{"name": "a"}, {"name": "a"}]}, "distinct variant names"),
        ({"pretrain": {"config": "nope.yaml"}}, "pretrain.config='nope.yaml'"),
        ({"finetune": {"enabled": True, "config": str(FT), "label_fractions": [0]}},
         "finetune.label_fractions"),
        ({"scratch": {"enabled": True, "lr_grid": [-1.0]}}, "scratch.lr_grid"),
        ({"colour": 1}, "unknown key 'colour'"),
        ({"variants": [{"name": "a", "overrides": ["mask.ratio"]}]}, "key.sub=value"),
    ],
)  # fmt: skip
def test_bad_study_files_name_the_key(tmp_path, patch, message):
    doc = yaml.safe_load(_study(tmp_path).read_text()) | patch
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=message):
        load_study(path)


def test_bad_override_in_a_cell_stops_before_any_work(tmp_path, capsys):
    path = _study(tmp_path, variants=[{"name": "v", "overrides": ["mask.ratio=1.5"]}])
    assert main(["study", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "study cell pretrain/v_s0: mask.ratio=1.5" in err
    assert not (tmp_path / "runs").exists()


def test_debug_executor_goes_through_submitit(tmp_path):
    pytest.importorskip("submitit")
    path = _study(tmp_path, seeds=[0], variants=[{"name": "v"}], scratch={"enabled": False})
    res = run_study(load_study(path), executor="debug", only=["pretrain/"])
    assert list(res.results) == ["pretrain/v_s0"]
    assert (tmp_path / "runs" / "submitit").is_dir()
    assert not res.failed and "finetune/v_f1_s0" not in res.results  # left out by --only


def test_a_failed_cell_skips_everything_that_needs_it(tmp_path, monkeypatch):
    import mimkit.study as study

    def fake(command, recipe, overrides, run_dir, log, threads):
        if command == "pretrain" and "mask.ratio=0.5" in overrides:
            raise RuntimeError("exit status 1: boom")
        return study_run(command, recipe, overrides, run_dir, log, threads)

    study_run = study.execute_cell
    monkeypatch.setattr(study, "execute_cell", fake)
    path = _study(tmp_path, seeds=[0], scratch={"enabled": False})
    res = run_study(load_study(path), jobs=2, threads=1, only=["pretrain/"])
    assert res.failed == {"pretrain/r50_s0": "exit status 1: boom"}
    assert "pretrain/r75_s0" in res.results
    res = run_study(load_study(path), jobs=1, threads=1, only=["pretrain/r50"])
    assert set(res.failed) == {"pretrain/r50_s0"}  # finetune/r50 waits, outside --only
    assert main(["study", "-c", str(path), "--report"]) == 0
    monkeypatch.setattr(study, "execute_cell", lambda *a: (_ for _ in ()).throw(RuntimeError("x")))
    res = run_study(load_study(path), jobs=1)
    assert res.failed["finetune/r50_f1_s0"] == "skipped: a cell it needs failed"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"common": ["data.nme=x"]}, "common: 'data.nme' is a key of no command"),
        ({"finetune": {"enabled": True, "config": str(FT), "label_fractions": [1.0],
                       "overrides": ["val_fraction=0"]}}, "needs a validation split"),
        ({"variants": [{"name": "scratch"}], "scratch": {"enabled": False}}, "scratch.name"),
    ],
)  # fmt: skip
def test_study_refuses_what_would_mislead(tmp_path, patch, message):
    doc = yaml.safe_load(_study(tmp_path).read_text()) | patch
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=message):
        run_study(load_study(path), dry_run=True)


def test_variants_with_the_same_command_validate(tmp_path, capsys):
    same = [
        {"name": "a", "overrides": ["mask.ratio=0.5"]},
        {"name": "b", "overrides": ["mask.ratio=0.5"]},
    ]
    path = _study(tmp_path, variants=same)
    assert main(["study", "-c", str(path), "--dry-run"]) == 0
    assert "finetune/b_f1_s1" in capsys.readouterr().out
