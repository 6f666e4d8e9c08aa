"""The schema of a study file (``mimkit study -c configs/studies/NAME.yaml``).

A study is a grid of ordinary runs: a base pretraining recipe, named variants of it (each a list
of dotted overrides: one per mask ratio, one per row of BEiT's Table 4, ...), seeds, and the
protocols that score every pretrained encoder (fine-tuning at label fractions, linear probe,
k-NN), with the from-scratch baseline as a row of its own whose fine-tuning learning rate is
chosen on the validation split from a small grid. Paths are relative to the working directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mimkit.config.core import fail, positive

__all__ = [
    "FinetuneProtocol",
    "ProtocolConfig",
    "ScratchConfig",
    "StageConfig",
    "StudyConfig",
    "VariantConfig",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class StageConfig:
    """A command's recipe and the overrides applied to it (after the recipe, before the cell's)."""

    config: str | None = None  # a YAML recipe; null: the stage is not run
    overrides: list[str] = field(default_factory=list)


@dataclass
class VariantConfig:
    """One row of the study: the base pretraining recipe with these overrides."""

    name: str = ""
    config: str | None = None  # its own pretraining recipe (null: pretrain.config)
    overrides: list[str] = field(default_factory=list)
    x: float | None = None  # its place on the plots' x axis (e.g. the mask ratio); null: bars
    label: str | None = None  # what the table says (null: the name)


@dataclass
class ProtocolConfig:
    enabled: bool = False
    config: str | None = None
    overrides: list[str] = field(default_factory=list)


@dataclass
class FinetuneProtocol(ProtocolConfig):
    label_fractions: list[float] = field(default_factory=lambda: [1.0])
    # overrides per label fraction (keys: the fraction as written, e.g. "0.01"), applied after
    # ``overrides``: the budget of each fraction (train.steps, eval_every_steps, ...)
    per_fraction: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class ScratchConfig:
    """The from-scratch baseline: the same protocols on a randomly initialized encoder.

    ``overrides`` describe its encoder (``model.init=null`` is added) and any recipe change it
    needs (DeiT-style: no layer decay). ``lr_grid``: fine-tuning learning rates (``optim.lr``)
    tried on the first seed at every label fraction; the one with the best validation top-1 is
    used for every seed. Empty: the fine-tuning recipe's own lr.
    """

    enabled: bool = False
    name: str = "scratch"
    overrides: list[str] = field(default_factory=list)
    finetune_overrides: list[str] = field(default_factory=list)  # fine-tuning only
    lr_grid: list[float] = field(default_factory=list)


@dataclass
class StudyConfig:
    name: str = ""
    description: str = ""
    out: str = "runs/studies/study"  # the cells' run directories (weights: not committed)
    results: str | None = (
        None  # per-cell JSON, table, plots (small: commit them); null: out/results
    )
    seeds: list[int] = field(default_factory=lambda: [0])
    # false: every seed pretrains its own encoder (the spread covers pretraining too); true: one
    # pretraining per variant (the first seed's), scored by every seed's protocols (cheaper; the
    # spread then covers the downstream runs only, and the table says so)
    shared_pretraining: bool = False
    # what every cell inherits (e.g. data.root=..., data.num_workers=0): applied to the recipes of
    # every command first, where the command has the key
    common: list[str] = field(default_factory=list)
    tokenizer: StageConfig = field(default_factory=StageConfig)  # BEiT: trained once, first seed
    pretrain: StageConfig = field(default_factory=StageConfig)
    variants: list[VariantConfig] = field(default_factory=list)
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    finetune: FinetuneProtocol = field(default_factory=FinetuneProtocol)
    linprobe: ProtocolConfig = field(default_factory=ProtocolConfig)
    knn: ProtocolConfig = field(default_factory=ProtocolConfig)
    x_label: str | None = None  # the plots' x axis when variants have x

    def resolve(self) -> None:
        if self.results is None:
            self.results = str(Path(self.out) / "results")

    def validate(self) -> None:
        if not _NAME.match(self.name or ""):
            fail("name", self.name, "a name of letters, digits and _.+- (the study's name)")
        if not self.seeds:
            fail("seeds", self.seeds, "at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            fail("seeds", self.seeds, "distinct seeds")
        for i, v in enumerate(self.variants):
            if v.config is None and self.pretrain.config is None:
                fail("pretrain.config", None, f"a pretraining recipe (variant {v.name!r} has none)")
            if v.config is not None and not Path(v.config).is_file():
                fail(f"variants[{i}].config", v.config, "a recipe file that exists")
        if not self.variants and not self.scratch.enabled:
            fail("variants", [], "at least one variant (or scratch.enabled=true)")
        names = [v.name for v in self.variants]
        for i, v in enumerate(self.variants):
            if not _NAME.match(v.name):
                fail(f"variants[{i}].name", v.name, "a name of letters, digits and _.+-")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            fail("variants", dup, "distinct variant names")
        if self.scratch.name in names:  # its cells would be the baseline's
            fail("scratch.name", self.scratch.name, "a name no variant has")
        if not _NAME.match(self.scratch.name):
            fail("scratch.name", self.scratch.name, "a name of letters, digits and _.+-")
        protocols = {"finetune": self.finetune, "linprobe": self.linprobe, "knn": self.knn}
        if not any(p.enabled for p in protocols.values()):
            fail(
                "finetune.enabled", False, "at least one protocol enabled (finetune, linprobe, knn)"
            )
        stages = {"tokenizer": self.tokenizer, "pretrain": self.pretrain, **protocols}
        for key, stage in stages.items():
            enabled = getattr(stage, "enabled", True) and stage.config is not None
            if enabled and not Path(stage.config).is_file():
                fail(f"{key}.config", stage.config, "a recipe file that exists")
            if getattr(stage, "enabled", False) and stage.config is None:
                fail(f"{key}.config", None, f"a recipe (the {key} protocol is enabled)")
        lists = {"common": self.common, "pretrain.overrides": self.pretrain.overrides,
                 "tokenizer.overrides": self.tokenizer.overrides,
                 "scratch.overrides": self.scratch.overrides,
                 "scratch.finetune_overrides": self.scratch.finetune_overrides}  # fmt: skip
        lists |= {f"{k}.overrides": p.overrides for k, p in protocols.items()}
        lists |= {f"variants[{i}].overrides": v.overrides for i, v in enumerate(self.variants)}
        lists |= {f"finetune.per_fraction.{k}": v for k, v in self.finetune.per_fraction.items()}
        for key, items in lists.items():
            for item in items:
                if "=" not in item:
                    fail(key, item, "overrides of the form key.sub=value")
        f = self.finetune
        if f.enabled:
            if not f.label_fractions:
                fail("finetune.label_fractions", f.label_fractions, "at least one fraction")
            for frac in f.label_fractions:
                if not 0 < frac <= 1:
                    fail("finetune.label_fractions", frac, "fractions in (0, 1]")
            wanted = {float(x) for x in f.label_fractions}
            for key in f.per_fraction:
                try:
                    value = float(key)
                except ValueError:
                    value = None
                if value not in wanted:
                    fail(f"finetune.per_fraction.{key}", key,
                         f"one of finetune.label_fractions {f.label_fractions}")  # fmt: skip
        for lr in self.scratch.lr_grid:
            positive("scratch.lr_grid", lr)
        if len(set(self.scratch.lr_grid)) != len(self.scratch.lr_grid):
            fail("scratch.lr_grid", self.scratch.lr_grid, "distinct learning rates")
