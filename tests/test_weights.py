"""The weights layer: provenance written and read in one place, files found once, layers."""

import ast
import json
from pathlib import Path

import pytest
import torch

from mimkit.weights import (
    PROVENANCE_VERSION,
    NotSafetensorsError,
    Provenance,
    load_weights,
    open_weights,
    read_metadata,
    save_weights,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "mimkit"


def _prov(**kw):
    base = dict(kind="encoder", method="mae", model_config={"arch": "vit_tiny", "depth": 6},
                mean=[0.5], std=[0.25], extra={"mask_ratio": 0.75})  # fmt: skip
    return Provenance(**(base | kw))


def test_provenance_round_trips_through_a_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(path, {"w": torch.ones(3)}, _prov())
    state, meta = load_weights(path)
    assert torch.equal(state["w"], torch.ones(3))
    assert meta["format"] == "mimkit" and meta["provenance_version"] == PROVENANCE_VERSION
    assert meta["mask_ratio"] == 0.75 and meta["model_config"]["depth"] == 6  # stored flat
    back = Provenance.from_metadata(meta, path)
    assert back == _prov()
    assert back.get("mask_ratio") == 0.75 and back.get("mean") == [0.5]
    assert back.get("layout", "none") == "none"


def test_a_file_written_before_the_version_reads_as_version_1(tmp_path):
    meta = {"format": "mimkit", "kind": "encoder", "method": "beit", "vocab_size": 8192}
    path = tmp_path / "old.safetensors"
    save_weights(path, {"w": torch.ones(1)}, meta)
    prov = Provenance.from_metadata(read_metadata(path), path)
    assert prov.version == 1 and prov.method == "beit" and prov.extra == {"vocab_size": 8192}


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"format": "pt", "kind": "encoder"}, "no mimkit provenance"),
        ({"format": "mimkit", "kind": "encoder", "provenance_version": 99}, "upgrade mimkit"),
        ({"format": "mimkit"}, "has no kind"),
        ({"format": "mimkit", "kind": "encoder", "mean": "0.5"}, "not a list of numbers"),
        ({"format": "mimkit", "kind": "encoder", "mean": [0.5], "std": [1, 2]}, "differ"),
    ],
)
def test_bad_provenance_is_refused_naming_the_file(meta, message):
    with pytest.raises(ValueError, match=message) as err:
        Provenance.from_metadata(meta, "some/file.safetensors")
    assert "some/file.safetensors" in str(err.value)


def test_extra_fields_may_not_shadow_typed_ones():
    with pytest.raises(ValueError, match="shadow"):
        _prov(extra={"kind": "classifier"}).to_metadata()


def test_a_model_init_is_opened_once_and_reopened_when_the_file_changes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_weights(run / "encoder.safetensors", {"w": torch.ones(2)}, _prov())
    first = open_weights(run)
    assert open_weights(run / "encoder.safetensors") is first  # the run or its file: one handle
    assert first.path == run / "encoder.safetensors" and first.provenance.kind == "encoder"
    assert torch.equal(first.load()["w"], torch.ones(2))
    save_weights(run / "encoder.safetensors", {"w": torch.zeros(5)}, _prov(kind="pretrain"))
    again = open_weights(run)
    assert again is not first and again.provenance.kind == "pretrain"


def test_a_pickle_is_never_opened(tmp_path):
    (tmp_path / "model.pth").write_bytes(b"\x80\x04junk")
    with pytest.raises(NotSafetensorsError, match="never unpickles"):
        open_weights(tmp_path / "model.pth")
    (tmp_path / "bad.safetensors").write_bytes(json.dumps({"x": 1}).encode())
    with pytest.raises(NotSafetensorsError, match="not a readable safetensors"):
        open_weights(tmp_path / "bad.safetensors")


def _imports(path: Path) -> set[str]:
    """Every mimkit module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mimkit"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mimkit")}
    return found


@pytest.mark.parametrize("layer", ["models", "config", "data"])
def test_the_lower_layers_never_import_the_engine_or_the_tasks(layer):
    upper = ("mimkit.engine", "mimkit.tasks", "mimkit.interop", "mimkit.cli", "mimkit.commands",
             "mimkit.study", "mimkit.bench")  # fmt: skip
    arrows = {
        f"{path.relative_to(SRC)} -> {mod}"
        for path in sorted((SRC / layer).rglob("*.py"))
        for mod in _imports(path)
        if mod.startswith(upper)
    }
    assert not arrows, sorted(arrows)


def test_the_weights_layer_imports_nothing_above_the_config_errors():
    assert _imports(SRC / "weights.py") <= {"mimkit.config.core"}
    assert _imports(SRC / "ranks.py") == set()


def test_the_config_modules_import_no_cycle():
    graph = {
        f"mimkit.config.{p.stem}": {m for m in _imports(p) if m.startswith("mimkit.config.")}
        for p in (SRC / "config").glob("*.py")
        if p.stem != "__init__"
    }

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n)))
                   for n in graph.get(start, ()))  # fmt: skip

    cycles = [m for m in graph if reaches(m, m)]
    assert not cycles, cycles
