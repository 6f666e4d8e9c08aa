"""``mimkit data shard`` and ``mimkit data verify``: WebDataset shards and image checks."""

from __future__ import annotations

import argparse
import json

from mimkit.commands.base import Command
from mimkit.config import ConfigError

__all__ = ["COMMANDS"]


def run_shard(args: argparse.Namespace) -> int:
    """Write the folder as shards and print what was written."""
    from mimkit.data.shards import MANIFEST, write_shards

    try:
        out = write_shards(
            args.src,
            args.out,
            shard_size=args.shard_size,
            max_samples=args.max_samples,
            seed=args.seed,
            shuffle=not args.no_shuffle,
        )
    except (ValueError, FileExistsError) as err:
        raise ConfigError(str(err)) from None
    manifest = json.loads((out / MANIFEST).read_text())
    print(
        f"data shard: {manifest['num_samples']} images in {len(manifest['shards'])} shard(s), "
        f"{len(manifest['classes'])} classes -> {out}"
    )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Decode every image once; exit status 1 when something is bad."""
    from mimkit.data.shards import verify

    try:
        res = verify(args.path, report=args.report)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    shards = f", {res['bad_shards']} shard problem(s)" if res["kind"] == "shards" else ""
    unsafe = f", {res['unsafe']} pickle member(s) left unread" if res["unsafe"] else ""
    report = f" (report: {args.report})" if args.report else ""
    print(
        f"data verify: {res['kind']} {args.path}: {res['images']} images, {res['ok']} ok, "
        f"{res['bad']} bad{shards}{unsafe}{report}"
    )
    return 1 if res["bad"] or res["bad_shards"] else 0


def _shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="image folder")
    p.add_argument("out", help="output directory (new or empty)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (1000)")
    p.add_argument("--max-samples", type=int, help="the first N images of the folder only")
    p.add_argument("--seed", type=int, default=0, help="seed of the order of samples (0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the folder's order")


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="an image folder, a shard directory or a .tar shard")
    p.add_argument("--report", help="write a JSON report listing every bad file or member")


COMMANDS = (
    Command(
        "data",
        help="image data: WebDataset tar shards, image checks",
        description="Prepare and check pretraining data.",
        actions=(
            Command(
                "shard",
                help="write an image folder as WebDataset tar shards",
                description="Write the images of SRC (class subfolders, or a flat unlabeled "
                "folder) as tar shards OUT/shard-000000.tar ... in a seeded random order, plus "
                "OUT/manifest.json (sample counts and sha256 per shard). Each sample: its "
                "original encoded image bytes and its label as text (KEY.cls). OUT must not "
                "exist or be empty.",
                arguments=_shard_args,
                run=run_shard,
            ),
            Command(
                "verify",
                help="decode every image of a folder or a shard directory",
                description="Decode every image of an image folder or a shard directory once "
                "(shards: also sha256 and sample counts against the manifest; pickle members "
                "are never unpickled). Exit status 1 when something is bad.",
                arguments=_verify_args,
                run=run_verify,
            ),
        ),
    ),
)
