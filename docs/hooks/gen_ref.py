"""Reference pages generated when the site is built, so that they cannot drift from the code.

An MkDocs hook (``hooks:`` in ``mkdocs.yml``). Nothing is written to ``docs/``; the pages exist
only in the build:

- ``reference/config.md``: every key of every command's config schema (the dataclass trees of
  ``mimkit.config``) with its type, its default and the comment written beside it in the source
  (else a note from ``config_notes.yaml`` beside this file);
- ``reference/cli.md``: every command's ``--help``, from ``mimkit.cli.build_parser()``; a page
  may also embed one command's help with the marker ``<!-- mimkit-help: COMMAND -->``;
- ``reference/api/``: one mkdocstrings page per module of ``src/mimkit`` (and their nav);
- the Markdown files of ``benchmarks/`` (its README and ``results/``), mounted under
  ``benchmarks/``; a docs page links to them by their path in the repository
  (``../benchmarks/results/...``), which this hook rewrites for the site.

The functions :func:`config_reference` and :func:`cli_reference` return Markdown and need
neither MkDocs nor PyTorch (``tests/test_docs.py`` calls them).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import io
import logging
import os
import posixpath
import re
import tokenize
import types
import typing
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
BENCHMARKS = ROOT / "benchmarks"
API_PLACEHOLDER = "reference/api/index.md"  # the nav entry in mkdocs.yml that on_config fills
log = logging.getLogger("mkdocs.hooks.gen_ref")

# command(s) -> config schema; the title says which commands read a recipe of this schema
SCHEMAS: list[tuple[str, str, str]] = [
    ("pretrain", "mimkit.config.pretrain:PretrainConfig", "`mimkit pretrain`, `mimkit bench`"),
    ("tokenizer", "mimkit.config.tokenizer:TokenizerConfig", "`mimkit tokenizer train`"),
    ("finetune", "mimkit.config.downstream:FinetuneConfig", "`mimkit finetune`, `mimkit eval`"),
    ("linprobe", "mimkit.config.downstream:LinprobeConfig", "`mimkit linprobe`"),
    ("knn", "mimkit.config.downstream:KnnCommandConfig", "`mimkit knn`"),
    ("segment", "mimkit.config.dense:SegmentConfig", "`mimkit segment`, `mimkit eval`"),
    ("detect", "mimkit.config.dense:DetectConfig", "`mimkit detect`, `mimkit eval`"),
    ("study", "mimkit.config.study:StudyConfig", "`mimkit study` (a study file)"),
]
# What a key means where its source has no comment beside it: docs/hooks/config_notes.yaml
NOTES: dict[str, str] = yaml.safe_load((Path(__file__).with_name("config_notes.yaml")).read_text())
# modules without an API page: the command line is documented by reference/cli.md
API_SKIP = ("mimkit.cli", "mimkit.commands", "mimkit.__main__")


def load_schema(spec: str) -> type:
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------
# config keys


class Key(typing.NamedTuple):
    path: str  # dotted; items of a list of sections are written `variants[].name`
    type: object  # the resolved type hint
    default: object
    doc: str
    section: str  # the top-level key it belongs to ("" for top-level scalars)
    context: str  # the comment of the nested section it is in ("MAE only")


@cache
def _source(path: str) -> tuple[ast.Module, dict[int, str], list[str]]:
    text = Path(path).read_text()
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    return ast.parse(text), comments, text.splitlines()


@cache
def _class_comments(cls: type) -> dict[str, str]:
    """Field name -> the comments of its statement: the block right above it and the one at
    the end of its line(s), as written in ``cls``'s own source."""
    import inspect

    try:
        tree, comments, lines = _source(inspect.getsourcefile(cls))
    except (OSError, TypeError):
        return {}
    node = next(
        (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__), None
    )
    if node is None:
        return {}
    out = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above = []
        line = stmt.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments.get(line, ""))
            line -= 1
        inline = [comments[i] for i in range(stmt.lineno, stmt.end_lineno + 1) if i in comments]
        inline = [c for c in inline if not c.startswith("fmt:")]
        parts = [" ".join(above).strip(), " ".join(inline).strip()]
        out[stmt.target.id] = " — ".join(p for p in parts if p)
    return out


def _field_doc(cls: type, name: str) -> str:
    """The comment of ``name`` in the most derived class of ``cls`` that has one."""
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass):
            doc = _class_comments(klass).get(name)
            if doc:
                return doc
    return ""


def _section_type(hint: object) -> tuple[type | None, bool]:
    """(dataclass, is a list of it) for a field's resolved type hint."""
    if dataclasses.is_dataclass(hint):
        return hint, False
    if typing.get_origin(hint) is list:
        (arg,) = typing.get_args(hint) or (None,)
        if dataclasses.is_dataclass(arg):
            return arg, True
    return None, False


def config_keys(schema: type) -> list[Key]:
    """Every key of ``schema`` with its default (from an instance: nested defaults included)."""
    keys: list[Key] = []

    def walk(cls: type, value: object, prefix: str, section: str, context: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path = f"{prefix}{f.name}"
            doc = _field_doc(cls, f.name)
            sub, many = _section_type(hints[f.name])
            if sub is not None:
                # a nested section's comment ("MAE only") is said on each of its keys; a
                # top-level section's under its heading (section_doc)
                inner = " — ".join(x for x in (context, doc if section else "") if x)
                child = sub() if many else getattr(value, f.name)
                walk(sub, child, f"{path}[]." if many else f"{path}.", section or f.name, inner)
                continue
            keys.append(Key(path, hints[f.name], getattr(value, f.name), doc, section, context))

    walk(schema, schema(), "", "", "")
    return keys


def key_doc(command: str, key: Key) -> str:
    """The source's comment, else the note for this command's key, else the general note."""
    doc = key.doc or NOTES.get(f"{command}:{key.path}") or NOTES.get(key.path, "")
    return " — ".join(x for x in (key.context, doc) if x)


def _fmt_value(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '""' if v == "" else v
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def _fmt_type(hint: object) -> str:
    """A resolved type hint in YAML's words: `int` or `null`; one of `a`, `b`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "`null`"
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{_fmt_value(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_fmt_type(a) for a in args)
    text = hint.__name__ if isinstance(hint, type) and not args else str(hint)
    return f"`{text.replace('typing.', '')}`"


def _md(text: str) -> str:
    """reST literals and roles (``x``, :class:`~x`) as Markdown code."""
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    return re.sub(r":(?:class|func|mod|meth|attr):`~?([^`]+)`", r"`\1`", text)


def _cell(text: str) -> str:
    """Markdown for a table cell: pipes and stars escaped, no raw HTML."""
    return _md(text).replace("<", "&lt;").replace("|", "\\|").replace("*", "\\*")


def _docstring(cls: type) -> str:
    import inspect

    doc = cls.__dict__.get("__doc__")
    if not doc or doc.startswith(cls.__name__ + "("):  # the dataclass' generated signature
        return ""
    return _md(inspect.cleandoc(doc))


def config_reference() -> str:
    out = [
        "# Config keys",
        "",
        "Every key of every command's recipe, generated from the config schemas (the dataclass",
        "trees in `src/mimkit/config/`) when this site is built. The default is the schema's;",
        "a recipe in `configs/` sets its own values, and `mimkit config -c RECIPE` prints a recipe",
        "resolved (presets, the absolute lr and, downstream, the architecture of `model.init`",
        "filled in). Override any key on the command line as `key.sub=value`. How recipes and",
        "overrides are loaded and checked: [the command line](../commands/index.md).",
        "",
    ]
    out += ["| command | schema | read by |", "|---|---|---|"]
    for name, spec, users in SCHEMAS:
        out.append(f"| [{name}](#{name}) | `{spec.replace(':', '.')}` | {users} |")
    out.append("")
    for name, spec, users in SCHEMAS:
        schema = load_schema(spec)
        out += [f"## {name} {{#{name}}}", "", f"`{spec.replace(':', '.')}`, read by {users}.", ""]
        doc = _docstring(schema)
        if doc:
            out += [doc, ""]
        keys = config_keys(schema)
        hints = typing.get_type_hints(schema)
        for section in dict.fromkeys(k.section for k in keys):
            rows = [k for k in keys if k.section == section]
            if section:
                out += [f"### {name}: `{section}` {{#{name}-{section}}}", ""]
                sub, _ = _section_type(hints[section])
                for doc in (_field_doc(schema, section), _docstring(sub) if sub else ""):
                    if doc:
                        out += [doc, ""]
            else:
                out += [f"### {name}: top-level keys {{#{name}-top}}", ""]
            out += ["| key | type | default | meaning |", "|---|---|---|---|"]
            for k in rows:
                out.append(
                    f"| `{k.path}` | {_fmt_type(k.type)} | `{_cell(_fmt_value(k.default))}` "
                    f"| {_cell(key_doc(name, k))} |"
                )
            out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# the command line


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of a parser's subcommands, in the parser's order; found
    through any action whose choices are parsers, so no particular registration is assumed."""
    found = []
    for action in parser._actions:
        choices = getattr(action, "choices", None)
        if not isinstance(choices, dict):
            continue
        helps = {a.dest: a.help or "" for a in getattr(action, "_choices_actions", [])}
        for name, sub in choices.items():
            if isinstance(sub, argparse.ArgumentParser):
                found.append((name, helps.get(name, ""), sub))
    return found


def walk_commands(
    parser: argparse.ArgumentParser | None = None, prefix: str = ""
) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """Every command and subcommand: ("visualize attention", help, parser), depth first."""
    for name, help_, sub in _subcommands(parser or _parser()):
        full = f"{prefix}{name}"
        yield full, help_, sub
        yield from walk_commands(sub, f"{full} ")


@cache
def _parser() -> argparse.ArgumentParser:
    from mimkit.cli import build_parser  # the public entry point, whatever registers commands

    return build_parser()


@contextlib.contextmanager
def _columns(n: int) -> Iterator[None]:
    """argparse wraps help to $COLUMNS: a fixed width, whatever terminal builds the site."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(n)
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def command_help(command: str) -> str | None:
    """``mimkit COMMAND --help`` as a text block, or None if there is no such command."""
    for full, _, sub in walk_commands():
        if full == command:
            with _columns(82):
                return f"```text\n$ mimkit {full} --help\n{sub.format_help().rstrip()}\n```"
    return None


def _anchor(command: str) -> str:
    return "mimkit-" + command.replace(" ", "-")


def cli_reference() -> str:
    parser = _parser()
    commands = list(walk_commands(parser))
    out = [
        "# Command line",
        "",
        "Every command's `--help`, generated from the parser (`mimkit.cli.build_parser()`)",
        "when this site is built. What the commands do, with examples:",
        "[Commands](../commands/index.md); the keys their recipes take: [Config keys](config.md).",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for full, help_, _ in commands:
        out.append(f"| [`mimkit {full}`](#{_anchor(full)}) | {_cell(help_)} |")
    with _columns(82):
        out += ["", "```text", "$ mimkit --help", parser.format_help().rstrip(), "```", ""]
        for full, _, sub in commands:
            level = "#" * (2 + full.count(" "))
            out += [f"{level} mimkit {full} {{#{_anchor(full)}}}", ""]
            out += ["```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# the API pages


def api_modules() -> list[str]:
    """Every module of src/mimkit with an API page, packages before their modules."""
    names = []
    for path in sorted((SRC / "mimkit").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if any(p.startswith("_") for p in parts) or name.startswith(API_SKIP):
            continue
        names.append(name)
    return sorted(names, key=lambda n: (n.count(".") > 1, n.rsplit(".", 1)[0], n))


def _summary(module: str) -> str:
    path = SRC / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    try:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    except SyntaxError:
        return ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    return _cell(first)


def _namespace_at(module: str) -> int:
    """How many leading parts of ``module`` are regular packages (all of them: its length)."""
    parts = module.split(".")
    for i in range(2, len(parts)):
        if not (SRC / Path(*parts[:i]) / "__init__.py").is_file():
            return i - 1
    return len(parts)


def _identifier(module: str) -> str:
    """What mkdocstrings loads for ``module``. griffe sees no submodules of a folder without
    ``__init__.py`` inside a package (``mimkit/engine``); on_config puts the folder around such a
    one on griffe's path, where it is a top-level namespace package (``engine.checkpoint``)."""
    parts = module.split(".")
    n = _namespace_at(module)
    return module if n == len(parts) else ".".join(parts[n:])


def griffe_paths() -> list[str]:
    """``src`` and the package folders that hold a namespace folder (see :func:`_identifier`)."""
    paths = [SRC]
    for module in api_modules():
        n = _namespace_at(module)
        if n < len(module.split(".")):
            paths.append(SRC / Path(*module.split(".")[:n]))
    return [str(p) for p in dict.fromkeys(paths)]


def _group(module: str) -> str:
    """The API page of a module: its subpackage (``mimkit.models``), or itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if (SRC / Path(*parts[:2])).is_dir() else module


def api_pages() -> dict[str, str]:
    """One page per subpackage (its modules as sections) or top-level module: a short nav."""
    groups: dict[str, list[str]] = {}
    for module in api_modules():
        groups.setdefault(_group(module), []).append(module)
    pages = {}
    rows = ["| module | what it is |", "|---|---|"]
    for group, modules in groups.items():
        body = [f"# `{group}`", ""]
        for module in modules:
            anchor = module.replace(".", "-")
            if module == group:  # the package: its docstring; its names are its modules'
                options = ["    options:", "      members: false"] if len(modules) > 1 else []
                body += [f"::: {_identifier(module)}", *options, ""]
                rows.append(f"| [`{module}`]({group}.md) | {_summary(module)} |")
                continue
            body += [f"## `{module}` {{#{anchor}}}", "", f"::: {_identifier(module)}",
                     "    options:", "      heading_level: 3", ""]  # fmt: skip
            rows.append(f"| [`{module}`]({group}.md#{anchor}) | {_summary(module)} |")
        pages[f"reference/api/{group}.md"] = "\n".join(body)
    pages["reference/api/index.md"] = "\n".join(
        [
            "# API reference",
            "",
            "Generated from the docstrings of `src/mimkit` when this site is built (mkdocstrings):",
            "one page per subpackage or module. The top-level package loads its names lazily, so",
            "`import mimkit` stays light; examples of the library in use:",
            "[Python API](../../python-api.md).",
            "",
            *rows,
            "",
        ]
    )
    return pages


def api_nav() -> list:
    groups = dict.fromkeys(_group(m) for m in api_modules())
    return [{"Overview": API_PLACEHOLDER}, *({g: f"reference/api/{g}.md"} for g in groups)]


# ---------------------------------------------------------------------------------------------
# MkDocs hooks

try:
    from mkdocs.plugins import event_priority
except ImportError:  # the functions above work without MkDocs

    def event_priority(priority):
        return lambda f: f


def _benchmark_pages() -> dict[str, Path]:
    files = [BENCHMARKS / "README.md", *sorted((BENCHMARKS / "results").rglob("*.md"))]
    return {f"benchmarks/{p.relative_to(BENCHMARKS).as_posix()}": p for p in files if p.is_file()}


@event_priority(100)  # before mkdocstrings' on_config, which starts its handlers
def on_config(config):
    """The API section of the nav (a placeholder entry in mkdocs.yml) lists every module."""

    def fill(items):
        for i, item in enumerate(items):
            if isinstance(item, dict):
                ((title, value),) = item.items()
                if value == API_PLACEHOLDER:
                    items[i] = {title: api_nav()}
                elif isinstance(value, list):
                    fill(value)

    fill(config["nav"] or [])
    plugin = config["plugins"].get("mkdocstrings")
    if plugin is not None:
        python = plugin.config.setdefault("handlers", {}).setdefault("python", {})
        python["paths"] = griffe_paths()
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    generated = {
        "reference/config.md": config_reference(),
        "reference/cli.md": cli_reference(),
        **api_pages(),
    }
    for uri, content in generated.items():
        files.append(File.generated(config, uri, content=content))
    for uri, path in _benchmark_pages().items():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_content(html, page, config, files):
    """GitHub's escaped pipes in table code (`a\\|b`) read as pipes; Sphinx roles in docstrings
    (:class:`X`) as plain code on the API pages."""
    html = re.sub(r"<code>[^<]*\\\|[^<]*</code>", lambda m: m.group(0).replace("\\|", "|"), html)
    if page.file.src_uri.startswith("reference/api/"):
        html = re.sub(r":(?:class|func|mod|meth|attr|data|exc|obj):(<code[^>]*>)~?", r"\1", html)
    return html


_LINK = re.compile(r"(\]\()([^)\s]+)(\))")
_HELP = re.compile(r"<!--\s*mimkit-help:\s*([a-z ]+?)\s*-->")


def _repo_path(src_uri: str) -> str:
    """Where a page's source lives in the repository."""
    return src_uri if src_uri.startswith("benchmarks/") else f"docs/{src_uri}"


def on_page_markdown(markdown, page, config, files):
    mounted = set(_benchmark_pages())
    here = _repo_path(page.file.src_uri)

    def link(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target):
            return m.group(0)
        path, _, frag = target.partition("#")
        repo = posixpath.normpath(posixpath.join(posixpath.dirname(here), path))
        if repo in mounted:  # a repository path -> its place in the site
            rel = posixpath.relpath(repo, posixpath.dirname(page.file.src_uri) or ".")
        elif repo.startswith("docs/") and here.startswith("benchmarks/"):
            rel = posixpath.relpath(repo[5:], posixpath.dirname(page.file.src_uri))
        else:
            return m.group(0)
        return f"{m.group(1)}{rel}{'#' + frag if frag else ''}{m.group(3)}"

    def help_block(m: re.Match) -> str:
        text = command_help(m.group(1))
        if text is None:
            log.warning("%s: no command 'mimkit %s' for its help marker", here, m.group(1))
            return ""
        return text

    return _HELP.sub(help_block, _LINK.sub(link, markdown))
