import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

MIMKIT = [sys.executable, "-m", "mimkit.cli"]


def test_the_command_has_help():
    proc = subprocess.run([*MIMKIT, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: mimkit" in proc.stdout


@pytest.mark.parametrize(
    "sub",
    [
        ["pretrain"],
        ["config"],
        ["inspect"],
        ["finetune"],
        ["linprobe"],
        ["knn"],
        ["visualize", "attention"],
        ["visualize", "reconstruction"],
        ["tokenizer", "train"],
        ["convert"],
        ["bench"],
        ["data", "shard"],
        ["data", "verify"],
    ],
)
def test_every_subcommand_has_help(sub, capsys):
    from mimkit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*sub, "--help"])
    assert exit_info.value.code == 0 and "usage: mimkit" in capsys.readouterr().out


def test_pretrain_then_inspect_and_resume_from_the_cli(tmp_path):
    from tests.conftest import DEMO, tiny_overrides

    args = [*MIMKIT, "pretrain", "-c", str(DEMO), *tiny_overrides(tmp_path / "r")]
    first = subprocess.run([*args, "train.max_steps=3"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "stopped by train.max_steps" in first.stdout and "encoder (timm)" in first.stdout
    again = subprocess.run([*args, "train.max_steps=3"], capture_output=True, text=True)
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "steps 16, epochs 2" in resumed.stdout
    enc = str(tmp_path / "r" / "encoder.safetensors")
    info = subprocess.run([*MIMKIT, "inspect", "--json", enc], capture_output=True, text=True)
    assert info.returncode == 0 and '"method": "mae"' in info.stdout


def test_demo_script_explains_missing_data(tmp_path):
    env = {**os.environ, "MIMKIT_FMNIST_ROOT": str(tmp_path / "nothing-here")}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 1
    assert "Fashion-MNIST not found" in proc.stderr and "dataset-fashion-mnist" in proc.stderr
