"""The documentation site: generated references complete, and a strict build.

The config-key and command-line references are generated when the site is built
(``docs/hooks/gen_ref.py``); these tests walk the schemas and the parser themselves and check that
nothing is missing, so a new key or command cannot go undocumented. The build test runs
``mkdocs build --strict``: a broken link, anchor, page or API reference fails it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "docs" / "hooks" / "gen_ref.py"


@pytest.fixture(scope="module")
def gen_ref():
    spec = importlib.util.spec_from_file_location("mimkit_docs_gen_ref", HOOK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key of a config dataclass, written as the reference writes it."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint)
        if dataclasses.is_dataclass(hint):
            out += _keys(hint, f"{prefix}{f.name}.")
        elif typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
            out += _keys(args[0], f"{prefix}{f.name}[].")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _sections(markdown: str) -> dict[str, str]:
    """The config reference cut at its `## command {#command}` headings."""
    parts = re.split(r"^## (\S+) \{#\S+\}$", markdown, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_config_reference_lists_every_key(gen_ref):
    sections = _sections(gen_ref.config_reference())
    for command, spec, _ in gen_ref.SCHEMAS:
        assert command in sections, f"no section for {command}"
        keys = _keys(gen_ref.load_schema(spec))
        assert keys
        missing = [k for k in keys if f"| `{k}` |" not in sections[command]]
        assert not missing, f"{command}: keys missing from the config reference: {missing}"


def test_every_config_schema_is_documented(gen_ref):
    """A dataclass in mimkit.config that no documented schema reaches is a command's config the
    reference does not list: add it to SCHEMAS in docs/hooks/gen_ref.py."""
    import mimkit.config

    reached: set[type] = set()

    def reach(cls: type) -> None:
        if cls in reached:
            return
        reached.add(cls)
        for hint in typing.get_type_hints(cls).values():
            for t in (hint, *typing.get_args(hint)):
                if dataclasses.is_dataclass(t):
                    reach(t)

    for _, spec, _ in gen_ref.SCHEMAS:
        reach(gen_ref.load_schema(spec))
    unreached = []
    for info in pkgutil.iter_modules(mimkit.config.__path__):
        module = importlib.import_module(f"mimkit.config.{info.name}")
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and dataclasses.is_dataclass(obj)
                and obj.__module__ == module.__name__
                and not any(issubclass(r, obj) for r in reached)
            ):
                unreached.append(f"{module.__name__}.{name}")
    assert not unreached, f"config dataclasses in no documented schema: {unreached}"


def test_every_key_has_a_meaning(gen_ref):
    empty = [
        f"{command}:{key.path}"
        for command, spec, _ in gen_ref.SCHEMAS
        for key in gen_ref.config_keys(gen_ref.load_schema(spec))
        if not gen_ref.key_doc(command, key)
    ]
    assert not empty, (
        f"keys with neither a comment beside the field in src/mimkit/config nor a note in "
        f"NOTES (docs/hooks/gen_ref.py): {empty}"
    )


def test_notes_name_existing_keys(gen_ref):
    keys = {
        (command, k)
        for command, spec, _ in gen_ref.SCHEMAS
        for k in _keys(gen_ref.load_schema(spec))
    }
    stale = []
    for note in gen_ref.NOTES:
        command, _, key = note.rpartition(":")
        if not any(k == key and (not command or c == command) for c, k in keys):
            stale.append(note)
    assert not stale, f"NOTES in docs/hooks/gen_ref.py name keys that do not exist: {stale}"


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append(f"{prefix}{name}")
                out += _commands(sub, f"{prefix}{name} ")
    return out


def test_cli_reference_lists_every_command(gen_ref):
    from mimkit.cli import build_parser

    text = gen_ref.cli_reference()
    commands = _commands(build_parser())
    assert {"pretrain", "finetune", "tokenizer train", "data verify"} <= set(commands)
    missing = [c for c in commands if not re.search(rf"^#+ mimkit {c} \{{", text, re.M)]
    assert not missing, f"commands missing from the CLI reference: {missing}"
    for c in commands:
        assert gen_ref.command_help(c).startswith(f"```text\n$ mimkit {c} --help\nusage:")


def test_every_command_has_a_page():
    """Each top-level command is linked from the commands index."""
    from mimkit.cli import build_parser

    index = (ROOT / "docs" / "commands" / "index.md").read_text()
    top = [c for c in _commands(build_parser()) if " " not in c]
    missing = [c for c in top if not re.search(rf"`mimkit {c}[` ]", index)]
    assert not missing, f"commands without a line in docs/commands/index.md: {missing}"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    for package in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed: pip install -e '.[docs]' (scripts/setup.sh)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's notice, not a build warning
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    site = tmp_path / "site"
    for page in ("index.html", "reference/config/index.html", "reference/cli/index.html",
                 "reference/api/mimkit.masking/index.html", "benchmarks/index.html"):  # fmt: skip
        assert (site / page).is_file(), page
    html = (site / "commands" / "pretrain" / "index.html").read_text()
    assert "usage: mimkit pretrain" in html, "the --help marker was not filled in"
    assert "fonts.googleapis" not in (site / "index.html").read_text()
    print(f"mkdocs build --strict: {seconds:.1f} s")
