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


# ---- papercuts: flags and overrides in any order; one-line errors, never a traceback ----


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_flags_and_overrides_mix_in_any_order(tmp_path, capsys):
    from mimkit.cli import main
    from tests.conftest import DEMO, tiny_overrides

    args = ["pretrain", "-c", str(DEMO), *tiny_overrides(tmp_path / "r")]
    assert main([*args, "train.max_steps=3"]) == 0
    # the README's order: the flag, then an override
    assert main([*args, "--resume", "train.max_steps=5"]) == 0
    assert "steps 5," in capsys.readouterr().out


def _images(folder, n_per_class=2):
    import numpy as np
    from PIL import Image

    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(folder / c / f"{i}.png")


def test_an_empty_image_folder_is_named_before_anything_else(tmp_path, capsys):
    from mimkit.cli import main
    from tests.conftest import DEMO

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    args = ["pretrain", "-c", str(DEMO), f"run.dir={tmp_path / 'r'}", "data.name=folder",
            f"data.root={tmp_path / 'empty'}"]  # fmt: skip
    assert main(args) == 2
    line = _error_line(capsys)
    assert line.startswith("mimkit: error: data.root=") and "no images" in line


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_data_set_too_small_for_one_step_is_one_line(tmp_path, capsys, command):
    from mimkit.cli import main
    from tests.conftest import DEMO

    _images(tmp_path / "imgs")
    if command == "pretrain":
        args = ["pretrain", "-c", str(DEMO), "eval.knn.enabled=false"]
    else:
        args = ["finetune", "-c", str(ROOT / "configs" / "finetune" / "fmnist_vit_tiny.yaml"),
                "model.init=null", "model.method=mae", "model.arch=vit_tiny", "model.depth=1",
                "model.img_size=28", "model.patch_size=4", "model.in_chans=1",
                f"data.eval_root={tmp_path / 'imgs'}", "val_fraction=0"]  # fmt: skip
    args += [f"run.dir={tmp_path / 'r'}", "data.name=folder", f"data.root={tmp_path / 'imgs'}",
             "data.num_workers=0"]  # fmt: skip
    assert main(args) == 2
    line = _error_line(capsys)
    assert "too small" in line and "train.batch_size=" in line


def test_weights_that_are_not_safetensors_are_one_line(tmp_path, capsys):
    import pickle

    from mimkit.cli import main
    from tests.conftest import ROOT

    fake = tmp_path / "tok.safetensors"
    fake.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    beit = ROOT / "configs" / "pretrain" / "beit_vit_tiny_fmnist.yaml"
    args = ["pretrain", "-c", str(beit), f"run.dir={tmp_path / 'r'}",
            f"tokenizer.checkpoint={fake}", "data.name=synthetic", "model.in_chans=1"]  # fmt: skip
    assert main(args) == 2
    assert "not a readable safetensors file" in _error_line(capsys)
    pt = tmp_path / "model.pth"
    pt.write_bytes(pickle.dumps({"model": {}}))
    assert main(["visualize", "reconstruction", str(pt)]) == 2
    assert "is not a .safetensors file" in _error_line(capsys)


def test_config_yaml_records_the_normalization_the_run_used(tmp_path):
    import yaml

    from mimkit.cli import main
    from tests.conftest import DEMO, tiny_overrides

    args = ["pretrain", "-c", str(DEMO), *tiny_overrides(tmp_path / "r")]
    assert main([*args, "train.max_steps=2"]) == 0
    data = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["data"]
    assert data["mean"] == [0.5] * 3 and data["std"] == [0.25] * 3  # SyntheticImages' own
    assert main([*args, "--resume"]) == 0  # null in the recipe still matches the recorded value
    assert main([*args, "--resume", "data.mean=[0.4,0.4,0.4]"]) == 2  # a real change does not


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["pretrain", "--help"],
        ["bench", "--help"],
        ["convert", "--help"],
        ["pretrain", "-c", "configs/pretrain/mae_vit_tiny_fmnist.yaml", "mask.ratio=2"],
        ["finetune", "-c", "configs/finetune/fmnist_vit_tiny.yaml", "model.init=nowhere"],
        ["knn", "-c", "configs/knn/fmnist_vit_tiny.yaml", "knn.k=0", "model.init=nowhere"],
        ["segment", "-c", "configs/segment/fmnist_mosaic_vit_tiny.yaml", "train.epochs=0"],
        ["study", "-c", "configs/studies/mae_mask_ratio_fmnist.yaml", "seeds=[]"],
    ],
)
def test_help_and_config_errors_answer_before_pytorch_is_imported(argv):
    """The papercut: every error waited for ``import torch`` (30-40 s on a busy machine)."""
    code = (
        "import sys\nfrom mimkit.cli import main\n"
        f"try:\n    rc = main({argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(rc)"
    )
    env = {k: v for k, v in os.environ.items() if k != "MIMKIT_PRECISION_AUTO"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=env)  # fmt: skip
    assert "torch was imported" not in proc.stderr, proc.stderr
    assert proc.returncode == (0 if "--help" in argv else 2), proc.stderr


def test_the_light_header_reader_agrees_with_safetensors(tmp_path):
    import torch

    from mimkit.engine.checkpoint import read_metadata, save_weights
    from mimkit.weights import read_header_metadata

    meta = {"format": "mimkit", "model_config": {"arch": "vit_tiny", "depth": 6}, "note": "x"}
    save_weights(tmp_path / "a.safetensors", {"w": torch.zeros(2)}, metadata=meta)
    assert read_header_metadata(tmp_path / "a.safetensors") == read_metadata(
        tmp_path / "a.safetensors"
    )
    (tmp_path / "b.safetensors").write_bytes(b"\x80\x04junk")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_header_metadata(tmp_path / "b.safetensors")


def test_every_command_of_the_table_registers_and_names_a_schema_that_exists():
    import argparse

    from mimkit.commands import all_commands
    from mimkit.commands.base import load_schema

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    commands = all_commands()
    for command in commands:
        command.register(sub)
        for c in (command, *command.actions):
            assert c.run is not None or c.actions, c.name
            if c.schema is not None:
                assert hasattr(load_schema(c.schema), "validate"), c.schema
    names = [c.name for c in commands]
    assert len(names) == len(set(names))
    assert {"pretrain", "finetune", "segment", "eval", "study", "bench"} <= set(names)
