"""Pretraining health: held-out loss, feature spread and a small k-NN while a run trains."""

import json

import pytest

from mimkit.config import load_config
from mimkit.tasks.health import _Watch
from mimkit.tasks.pretrain import run_pretrain
from tests.conftest import DEMO, tiny_overrides


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_pretraining_run_scores_its_health_every_epoch(tmp_path):
    run = tmp_path / "run"
    over = tiny_overrides(run, **{"train.epochs": 2, "eval.health.knn_train": 32})
    res = run_pretrain(load_config(DEMO, over))
    health = [r for r in _rows(run) if "health_loss" in r]
    assert [r["step"] for r in health] == [8, 16] and res.train.step == 16
    for r in health:
        assert r["health_held_out"] == 1 and r["health_loss"] > 0  # synthetic: its own test seed
        assert r["health_feature_std"] > 1e-3 and 0 <= r["health_knn_top1"] <= 100
    assert (run / "figures" / "health_curves.png").is_file()
    assert (run / "tensorboard").is_dir()


def test_health_can_be_switched_off(tmp_path):
    run = tmp_path / "run"
    run_pretrain(load_config(DEMO, tiny_overrides(run, **{"eval.health.every_epochs": "null"})))
    assert not [r for r in _rows(run) if "health_loss" in r]
    assert not (run / "figures" / "health_curves.png").exists()


def test_a_stalled_loss_and_collapsed_features_are_said(capsys):
    watch = _Watch(window=2)
    for loss in (1.0, 0.8, 0.9, 0.85):
        watch({"health_loss": loss, "health_feature_std": 0.2})
    err = capsys.readouterr().err
    assert "has not improved for 2 evaluations (0.8000 before, 0.8500 now)" in err
    watch({"health_loss": 0.1, "health_feature_std": 1e-6})
    assert "features have collapsed" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["eval.health.images=0", "eval.health.knn_train=-1"])
def test_bad_health_settings_are_config_errors(tmp_path, bad):
    from mimkit.config import ConfigError

    with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
        load_config(DEMO, [*tiny_overrides(tmp_path), bad])
