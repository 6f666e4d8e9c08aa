"""train.precision=auto: bf16 where the device computes it natively, fp32 elsewhere."""

from __future__ import annotations

import pytest
import yaml

from mimkit.config import ConfigError, PretrainConfig, core, load_config
from tests.conftest import DEMO, tiny_overrides


def test_default_is_auto_and_resolves_when_loaded(monkeypatch):
    assert PretrainConfig().train.precision == "auto"
    monkeypatch.setenv("MIMKIT_PRECISION_AUTO", "bf16")
    assert load_config(DEMO).train.precision == "bf16"
    monkeypatch.setenv("MIMKIT_PRECISION_AUTO", "fp32")
    assert load_config(DEMO).train.precision == "fp32"
    # an explicit value is kept whatever the machine
    assert load_config(DEMO, ["train.precision=bf16"]).train.precision == "bf16"


def test_bad_forced_value_is_a_config_error(monkeypatch):
    monkeypatch.setenv("MIMKIT_PRECISION_AUTO", "fp8")
    with pytest.raises(ConfigError, match="MIMKIT_PRECISION_AUTO='fp8'"):
        load_config(DEMO)


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu avx2 avx512f avx512_bf16 sse", True),  # AMD Zen 4 / Intel Cooper Lake
        ("fpu avx2 avx512f amx_bf16 amx_tile", True),  # Intel Sapphire Rapids
        ("fpu avx2 avx512f avx512bw", False),  # Skylake: emulated bf16 is slower than fp32
    ],
)
def test_cpu_detection_reads_the_flags(monkeypatch, flags, native):
    monkeypatch.setattr(core, "cpu_flags", lambda: set(flags.split()))
    got, why = core.native_bf16("cpu")
    assert got is native and "bf16" in why
    monkeypatch.delenv("MIMKIT_PRECISION_AUTO")
    cfg = load_config(DEMO, ["run.device=cpu"])
    assert cfg.train.precision == ("bf16" if native else "fp32")


def test_cpu_flags_parser(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: a avx512_bf16 b\n\nprocessor\t: 1\nflags : x\n")
    assert core.cpu_flags(info) == {"a", "avx512_bf16", "b"}
    assert core.cpu_flags(tmp_path / "missing") is None


def test_run_saves_and_prints_the_resolved_precision(tmp_path, monkeypatch, capsys):
    from mimkit.tasks.pretrain import run_pretrain

    monkeypatch.setenv("MIMKIT_PRECISION_AUTO", "bf16")
    cfg = load_config(DEMO, tiny_overrides(tmp_path / "r", **{"train.epochs": 1}))
    run_pretrain(cfg)
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["train"]["precision"] == "bf16"
    assert "precision bf16" in capsys.readouterr().out


def test_config_built_in_python_resolves_at_run_start(tmp_path, monkeypatch):
    from mimkit.engine.rundir import prepare_run

    monkeypatch.setenv("MIMKIT_PRECISION_AUTO", "bf16")
    cfg = PretrainConfig()
    cfg.run.dir = str(tmp_path / "p")
    prepare_run(cfg, resume=False)
    assert cfg.train.precision == "bf16"
    saved = yaml.safe_load((tmp_path / "p" / "config.yaml").read_text())
    assert saved["train"]["precision"] == "bf16"
