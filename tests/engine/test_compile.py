"""train.compile: the model is compiled in place and trains as it does eagerly."""

import json

import pytest
import torch

from mimkit.config import ConfigError, load_config
from mimkit.engine import checkpoint as ckpt
from mimkit.tasks.pretrain import run_pretrain
from tests.conftest import DEMO, tiny_overrides

BEIT_PIXELS = {"model.method": "beit", "target.kind": "pixels", "mask.strategy": "blockwise",
               "mask.num_masked": 6, "mask.min_block": 2}  # fmt: skip


def _losses(run) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.mark.parametrize("extra", [{}, BEIT_PIXELS], ids=["mae", "beit"])
def test_a_compiled_model_trains_like_the_eager_one(tmp_path, extra):
    # aot_eager traces forward and backward as inductor does, without a C++ compiler
    runs = {}
    for name, flag in (("eager", False), ("compiled", True)):
        args = tiny_overrides(tmp_path / name, **{"train.epochs": 1, **extra})
        args += [f"train.compile={flag}", "train.compile_backend=aot_eager"]
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        res = run_pretrain(load_config(DEMO, args))
        assert res.train.step == 8
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) is flag, graphs  # dynamo captured the model's forward
        runs[name] = tmp_path / name
    assert _losses(runs["compiled"]) == pytest.approx(_losses(runs["eager"]), rel=1e-4)
    weights = [
        ckpt.load_weights(ckpt.latest_checkpoint(r / "checkpoints") / "model.safetensors")[0]
        for r in runs.values()
    ]
    assert weights[0].keys() == weights[1].keys()  # no "_orig_mod." prefix
    assert not any("_orig_mod" in k for k in weights[1])
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    ("key", "value"),
    [("train.compile_mode", "fastest"), ("train.compile_backend", "no_such_backend"),
     ("train.compile_mode", "max-autotune")],  # a mode is inductor's; the backend is aot_eager
)  # fmt: skip
def test_bad_compile_settings_name_the_key(tmp_path, key, value):
    args = [*tiny_overrides(tmp_path / "r"), "train.compile=true", f"{key}={value}"]
    if value == "max-autotune":
        args.append("train.compile_backend=aot_eager")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(DEMO, args)
