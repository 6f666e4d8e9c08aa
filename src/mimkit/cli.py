"""The ``mimkit`` command: thin subcommands, config -> task.

User errors (bad recipes, overrides, paths) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from mimkit.config import ConfigError, load_config

__all__ = ["main"]

OVERRIDES_HELP = "config overrides as key.sub=value (dotlist), applied after the recipe"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)


def _resume(args: argparse.Namespace, cfg) -> bool:
    """``--resume``, or a worker that torchrun restarted (``--max-restarts``) after a failure and
    whose run already has a complete checkpoint."""
    from mimkit.engine.rundir import restarted_with_checkpoint

    return bool(args.resume) or restarted_with_checkpoint(cfg)


def _dry_run(cfg, plan: str) -> int:
    """``--dry-run``: the resolved config and :mod:`mimkit.tasks.dryrun`'s plan; nothing runs."""
    from mimkit.config import to_dict
    from mimkit.tasks import dryrun

    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    print(dryrun.format_plan(getattr(dryrun, plan)(cfg)))
    return 0


def _add_dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, parameters, batch and accumulation, steps and "
                   "FLOPs per step (the model on the meta device), and stop")  # fmt: skip


def _print_skipped(run_dir: Path) -> None:
    """The closing summary's line on images that could not be decoded (``data.bad_images``)."""
    report = Path(run_dir) / "skipped_images.jsonl"
    if not report.is_file():
        return
    import json

    paths = set()
    for line in report.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut by a crash
            paths.add(json.loads(line)["path"])
    if paths:
        print(f"  skipped images: {len(paths)} could not be decoded, each replaced by the next "
              f"(listed in {report})")  # fmt: skip


def _cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        return _dry_run(cfg, "pretrain_plan")
    from mimkit.tasks.pretrain import run_pretrain  # PyTorch: only once the config is valid

    result = run_pretrain(cfg, resume=_resume(args, cfg))
    run_dir = result.run_dir
    print(f"\nrun directory: {run_dir}")
    print(
        f"  steps {result.train.step}, epochs {result.train.epoch}, "
        f"last loss {result.train.loss:.4f}"
    )
    print(f"  config:         {run_dir / 'config.yaml'}")
    print(
        f"  metrics:        {run_dir / 'metrics.jsonl'}  (TensorBoard: {run_dir / 'tensorboard'})"
    )
    print(f"  checkpoints:    {run_dir / 'checkpoints'}")
    if result.encoder_path:
        print(f"  encoder (timm): {result.encoder_path}")
    if result.figure_path and result.figure_path.exists():
        print(f"  figure:         {result.figure_path}")
    for name, r in result.knn.items():
        print(
            f"  k-NN top-1 ({name}): {r.top1:.2f}%  (k={r.k}, T={r.temperature}, {r.pool} pool, "
            f"{r.num_train} train / {r.num_test} test)"
        )
    _print_skipped(run_dir)
    if result.train.stopped_early:
        print(f"  stopped by train.max_steps; continue with --resume (run.dir={run_dir})")
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from mimkit.config import TokenizerConfig

    cfg = load_config(args.config, args.overrides, schema=TokenizerConfig)
    if args.dry_run:
        return _dry_run(cfg, "tokenizer_plan")
    from mimkit.tasks.tokenizer import run_tokenizer

    result = run_tokenizer(cfg, resume=_resume(args, cfg))
    run_dir, m = result.run_dir, result.metrics
    print(f"\nrun directory: {run_dir}")
    print(f"  steps {result.train.step}, epochs {result.train.epoch}")
    print(f"  tokenizer:  {result.tokenizer_path}")
    print(f"  figure:     {run_dir / 'figures' / 'tokenizer_reconstruction.png'}")
    print(f"  metrics:    {run_dir / 'metrics.jsonl'}, {run_dir / 'eval.json'}")
    if m:
        print(
            f"  through hard tokens on {m['num_images']} held-out images: PSNR {m['psnr']:.2f} dB "
            f"(constant-image floor {m['psnr_floor']:.2f} dB), MSE {m['recon_mse']:.4f}; "
            f"codebook perplexity {m['perplexity']:.1f}, codes used {100 * m['codes_used']:.1f}% "
            f"of {cfg.tokenizer.vocab_size}"
        )
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from mimkit.config.downstream import FinetuneConfig

    cfg = load_config(args.config, args.overrides, schema=FinetuneConfig)
    if args.dry_run:
        return _dry_run(cfg, "finetune_plan")
    from mimkit.tasks.finetune import run_finetune

    r = run_finetune(cfg, resume=_resume(args, cfg))
    print(f"\nrun directory: {r.run_dir}")
    print(f"  steps {r.train.step}, epochs {r.train.epoch}, last loss {r.train.loss:.4f}")
    split = "validation" if cfg.val_fraction > 0 else "evaluation"
    if r.best:
        print(
            f"  best {split} top-1 {r.best['top1']:.2f}% / top-5 {r.best['top5']:.2f}% at epoch "
            f"{r.best['epoch']} ({r.best['which']} weights): {r.best_path}"
        )
    if r.last:
        print(
            f"  last {split} top-1 {r.last['top1']:.2f}% / top-5 {r.last['top5']:.2f}%: "
            f"{r.last_path}"
        )
    if r.test:
        print(
            f"  test top-1 {r.test['top1']:.2f}% / top-5 {r.test['top5']:.2f}% "
            f"({r.test['num_images']} images, scored once with model_best"
            + (", chosen on this same split: optimistic)" if r.test.get("note") else ")")
        )
    print(f"  metrics: {r.run_dir / 'metrics.jsonl'}, {r.run_dir / 'eval.json'}, test.json")
    print(f"  figure:  {r.run_dir / 'figures' / 'finetune_curves.png'}")
    _print_skipped(r.run_dir)
    if r.train.stopped_early:
        print(f"  stopped by train.max_steps; continue with --resume (run.dir={r.run_dir})")
    return 0


def _report_dense(r, primary: str, figure: str) -> None:
    print(f"\nrun directory: {r.run_dir}")
    print(f"  steps {r.train.step}, epochs {r.train.epoch}, last loss {r.train.loss:.4f}")
    for which, rec, path in (("best", r.best, r.best_path), ("last", r.last, r.last_path)):
        if rec:
            shown = ", ".join(
                f"{k} {v:.2f}"
                for k, v in rec.items()
                if isinstance(v, float) and k not in ("epoch",) and "_map_" not in k[4:]
            )
            print(f"  {which} (epoch {rec['epoch']:g}): {shown}: {path}")
    print(f"  metrics: {r.run_dir / 'metrics.jsonl'}, {r.run_dir / 'eval.json'}")
    print(f"  figures: {r.run_dir / 'figures' / figure}, {r.run_dir / 'figures'}/*_curves.png")
    _print_skipped(r.run_dir)
    if r.train.stopped_early:
        print(f"  stopped by train.max_steps; continue with --resume (run.dir={r.run_dir})")


def _cmd_eval(args: argparse.Namespace) -> int:
    kind = _schema("auto", args.config).__name__
    if kind in ("SegmentConfig", "DetectConfig"):  # a configs/segment or configs/detect recipe
        cfg = load_config(args.config, args.overrides, schema=_schema("auto", args.config))
        from mimkit.tasks.evaluate import run_dense_eval

        r = run_dense_eval(cfg)
        shown = {k: v for k, v in r.metrics.items() if isinstance(v, float)}
        print(f"eval ({r.split}, {r.metrics['num_images']} images): "
              + ", ".join(f"{k} {v:.2f}" for k, v in shown.items()))  # fmt: skip
        print(f"results: {r.run_dir / 'eval.json'}")
        return 0
    from mimkit.config.downstream import FinetuneConfig

    cfg = load_config(args.config, args.overrides, schema=FinetuneConfig)
    from mimkit.tasks.evaluate import run_eval

    r = run_eval(cfg)
    m = r.metrics
    print(
        f"eval ({r.split}, {m['num_images']} images, {cfg.train.precision}): top-1 "
        f"{m['top1']:.2f}% / top-5 {m['top5']:.2f}%, loss {m['loss']:.4f}"
    )
    print(f"results: {r.run_dir / 'eval.json'}")
    _print_skipped(r.run_dir)
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    from mimkit.config.dense import SegmentConfig

    cfg = load_config(args.config, args.overrides, schema=SegmentConfig)
    if args.dry_run:
        return _dry_run(cfg, "dense_plan")
    from mimkit.tasks.segment import run_segment

    _report_dense(run_segment(cfg, resume=_resume(args, cfg)), "mIoU", "segmentation.png")
    return 0


def _cmd_detect(args: argparse.Namespace) -> int:
    from mimkit.config.dense import DetectConfig

    cfg = load_config(args.config, args.overrides, schema=DetectConfig)
    if args.dry_run:
        return _dry_run(cfg, "dense_plan")
    from mimkit.tasks.detect import run_detect

    _report_dense(run_detect(cfg, resume=_resume(args, cfg)), "box_map", "detection.png")
    return 0


def _cmd_linprobe(args: argparse.Namespace) -> int:
    from mimkit.config.downstream import LinprobeConfig

    cfg = load_config(args.config, args.overrides, schema=LinprobeConfig)
    from mimkit.tasks.linprobe import run_linprobe

    r = run_linprobe(cfg)
    print(f"\nrun directory: {r.run_dir}")
    print(
        f"  linear probe top-1 {r.top1:.2f}% / top-5 {r.top5:.2f}% (block {r.layer + 1}, "
        f"{cfg.probe.pool} pool, {cfg.probe.optimizer}, {r.num_train} train / {r.num_test} test)"
    )
    if len(r.per_layer_top1) > 1:
        print("  test top-1 by block: " + " ".join(f"{a:.1f}" for a in r.per_layer_top1))
    if r.raw_pixels:
        print(f"  raw pixels, same probe: top-1 {r.raw_pixels['top1']:.2f}%")
    print(f"  results: {r.run_dir / 'eval.json'}, probe: {r.run_dir / 'probe.safetensors'}")
    _print_skipped(r.run_dir)
    return 0


def _cmd_knn(args: argparse.Namespace) -> int:
    from mimkit.config.downstream import KnnCommandConfig

    cfg = load_config(args.config, args.overrides, schema=KnnCommandConfig)
    from mimkit.tasks.knn import run_knn

    for name, r in run_knn(cfg).items():
        print(
            f"k-NN top-1 ({name}): {r.top1:.2f}%  (k={r.k}, T={r.temperature}, {r.pool}, "
            f"{r.num_train} train / {r.num_test} test)"
        )
    print(f"results: {cfg.run.dir}/eval.json")
    _print_skipped(Path(cfg.run.dir))
    return 0


def _patch(text: str) -> tuple[int, int] | str:
    if text == "cls":
        return "cls"
    try:
        row, col = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ROW,COL (e.g. 3,4) or cls") from None
    return row, col


def _cmd_visualize_attention(args: argparse.Namespace) -> int:
    from mimkit.tasks.visualize import visualize_attention

    paths = visualize_attention(
        args.checkpoint,
        paths=args.images,
        fashion_mnist=args.fashion_mnist,
        patches=args.patch,
        block=args.block,
        out=args.out,
    )
    for p in paths:
        print(f"wrote {p}")
    return 0


def _cmd_visualize_reconstruction(args: argparse.Namespace) -> int:
    from mimkit.tasks.visualize import visualize_reconstruction

    path = visualize_reconstruction(
        args.checkpoint,
        paths=args.images,
        fashion_mnist=args.fashion_mnist,
        mask_ratio=args.mask_ratio,
        seed=args.seed,
        out=args.out,
    )
    print(f"wrote {path}")
    return 0


def _schema(kind: str, path: str) -> type:
    from mimkit.config import PretrainConfig, TokenizerConfig
    from mimkit.config.dense import DetectConfig, SegmentConfig
    from mimkit.config.downstream import FinetuneConfig, KnnCommandConfig, LinprobeConfig

    schemas = {
        "pretrain": PretrainConfig,
        "tokenizer": TokenizerConfig,
        "finetune": FinetuneConfig,
        "linprobe": LinprobeConfig,
        "knn": KnnCommandConfig,
        "segment": SegmentConfig,
        "detect": DetectConfig,
    }
    if kind == "auto":  # configs/<kind>/recipe.yaml
        kind = Path(path).parent.name if Path(path).parent.name in schemas else "pretrain"
    return schemas[kind]


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from mimkit.config import to_dict

    cfg = load_config(args.config, args.overrides, schema=_schema(args.kind, args.config))
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from mimkit.study import load_study, read_results, run_study, write_report

    cfg = load_study(args.config, args.overrides)
    slurm = {}
    for item in args.slurm or []:
        if "=" not in item:
            raise ConfigError(f"--slurm {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        slurm[key] = yaml.safe_load(value)
    if args.report:
        from mimkit.study import StudyResult, plan

        cells = plan(cfg)
        res = write_report(StudyResult(cfg, cells, read_results(cfg, cells), {}))
    else:
        res = run_study(cfg, jobs=args.jobs, threads=args.threads, dry_run=args.dry_run,
                        executor=args.executor, slurm=slurm, only=args.only)  # fmt: skip
    if args.dry_run:
        return 0
    print(f"\nstudy {cfg.name}: {len(res.results)}/{len(res.cells)} cells done")
    print(f"  table: {res.table_md} ({res.table_json.name})")
    for path in res.plots:
        print(f"  plot:  {path}")
    print()
    print(res.table_md.read_text())
    if res.failed:
        print(f"mimkit: error: {len(res.failed)} cells failed or were skipped:", file=sys.stderr)
        for cid, why in res.failed.items():
            print(f"  {cid}: {why}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mimkit", description="Masked image modeling (MAE, BEiT) for Vision Transformers."
    )
    from mimkit import __version__

    parser.add_argument("--version", action="version", version=f"mimkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from mimkit.commands.bench import add_bench_parser

    add_bench_parser(sub)  # mimkit bench: throughput, MFU, the comparison with HF

    p = sub.add_parser(
        "eval",
        help="score a classifier, segmenter or detector checkpoint on a split; trains nothing",
        description="Score a checkpoint on the evaluation split of a recipe, training nothing "
        "(the official repos' --eval): with a fine-tuning recipe, a classifier (a mimkit "
        "fine-tuning, or an official MAE/BEiT, timm or Hugging Face classifier converted with "
        "`mimkit convert`): top-1, top-5, loss; with a configs/segment or configs/detect recipe, "
        "the model_best.safetensors of a segment / detect run: mIoU or box/mask mAP. Results in "
        "run.dir/eval.json.",
    )
    _add_config_args(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "pretrain",
        help="pretrain a ViT with MAE or BEiT (masked image modeling)",
        description="Pretrain a ViT with MAE or BEiT (model.method). Writes config.yaml, "
        "metrics.jsonl, TensorBoard events, checkpoints/, figures/ and encoder.safetensors to "
        "run.dir.",
    )
    _add_config_args(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in run.dir from its latest complete checkpoint",
    )
    _add_dry_run(p)
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained (or random) ViT for classification",
        description="Fine-tune end to end (BEiT / MAE protocol: layer-wise lr decay, Mixup/CutMix, "
        "RandAugment, label smoothing, drop path). model.init: a pretraining or fine-tuning run, "
        "checkpoint or .safetensors file; null trains from scratch. Writes config.yaml, "
        "metrics.jsonl, eval.json, checkpoints/, model_best.safetensors, "
        "model_last.safetensors and figures/finetune_curves.png to run.dir.",
    )
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run in run.dir")
    _add_dry_run(p)
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser(
        "linprobe",
        help="linear probe on frozen features",
        description="Linear probing (MAE: BatchNorm without affine + linear, LARS; BEiT: the best "
        "block with probe.layers=all) on cached frozen features. Writes eval.json, "
        "probe.safetensors and metrics.jsonl to run.dir.",
    )
    _add_config_args(p)
    p.set_defaults(func=_cmd_linprobe)

    p = sub.add_parser(
        "knn",
        help="weighted k-NN on frozen features",
        description="Weighted k-NN (cosine similarity, temperature) on the frozen features of any "
        "block. Writes eval.json to run.dir.",
    )
    _add_config_args(p)
    p.set_defaults(func=_cmd_knn)

    p = sub.add_parser(
        "segment",
        help="semantic segmentation with a pretrained ViT (UperNet or SETR-PUP)",
        description="Semantic segmentation (BEiT Sec. 3.2): the ViT of model.init (position "
        "tables interpolated to model.img_size) under UperNet (four blocks) or SETR-PUP, "
        "layer-wise lr decay, warm-up then linear decay; mIoU, per-class IoU and pixel "
        "accuracy with whole-image or sliding-window inference. Data: the Fashion-MNIST mosaic "
        "or ADE20K's folder layout. Writes config.yaml, metrics.jsonl, eval.json, checkpoints/, "
        "model_best / model_last.safetensors and figures/segmentation.png to run.dir.",
    )
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run in run.dir")
    _add_dry_run(p)
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser(
        "detect",
        help="object detection with a pretrained ViT (ViTDet pyramid + Faster/Mask R-CNN)",
        description="Detection (ViTDet): a simple feature pyramid from the ViT of model.init "
        "feeding torchvision's Faster R-CNN, or Mask R-CNN where masks exist; COCO-style box (and "
        "mask) mAP. Data: the Fashion-MNIST mosaic or COCO-format annotations. Writes config.yaml, "
        "metrics.jsonl, eval.json, checkpoints/, model_best / model_last.safetensors and "
        "figures/detection.png to run.dir.",
    )
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run in run.dir")
    _add_dry_run(p)
    p.set_defaults(func=_cmd_detect)

    p = sub.add_parser(
        "visualize",
        help="attention maps and MAE reconstructions as PNG",
        description="Figures from checkpoints.",
    )
    vis = p.add_subparsers(dest="visualize_what", metavar="FIGURE", required=True)

    def _image_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("images", nargs="*", metavar="IMAGE", help="image files")
        q.add_argument(
            "--fashion-mnist",
            type=int,
            nargs="+",
            default=[],
            metavar="INDEX",
            help="Fashion-MNIST test images by index (data from MIMKIT_FMNIST_ROOT or "
            "/usr/share/datasets/fashion-mnist)",
        )

    p = vis.add_parser(
        "attention",
        help="self-attention of reference patches (BEiT Figure 3)",
        description="For chosen reference patches, the self-attention of a block (default: the "
        "last) over the image, for each head and their mean. CHECKPOINT: any mimkit encoder, "
        "pretraining or fine-tuning checkpoint or run directory.",
    )
    p.add_argument("checkpoint")
    _image_args(p)
    p.add_argument(
        "--patch",
        type=_patch,
        action="append",
        metavar="ROW,COL|cls",
        help="reference patch on the patch grid, repeatable (default: the centre and cls)",
    )
    p.add_argument("--block", type=int, default=-1, help="block index (default -1, the last)")
    p.add_argument("--out", default="attention.png", help="PNG path (one per image: _0, _1 ...)")
    p.set_defaults(func=_cmd_visualize_attention)

    p = vis.add_parser(
        "reconstruction",
        help="MAE reconstructions of images",
        description="Original | masked | reconstruction | reconstruction + visible for an MAE "
        "checkpoint with its decoder (a pretraining run directory or checkpoints/ckpt-*).",
    )
    p.add_argument("checkpoint")
    _image_args(p)
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the pretraining's")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    p.add_argument("--out", default="reconstruction.png", help="PNG path")
    p.set_defaults(func=_cmd_visualize_reconstruction)

    p = sub.add_parser(
        "tokenizer",
        help="visual tokenizers for BEiT",
        description="Train a discrete VAE tokenizer whose token grid matches a ViT patch grid.",
    )
    tok = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    p = tok.add_parser(
        "train",
        help="train a dVAE tokenizer",
        description="Train a discrete VAE (Gumbel-softmax, KL to a uniform prior). Writes "
        "tokenizer.safetensors, metrics.jsonl, figures/tokenizer_reconstruction.png to run.dir.",
    )
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run in run.dir")
    _add_dry_run(p)
    p.set_defaults(func=_cmd_tokenizer_train)

    p = sub.add_parser(
        "study",
        help="run a grid of pretraining variants x seeds x protocols and print its table",
        description="Run a study file (configs/studies/): every pretraining variant and seed, "
        "scored by fine-tuning (label fractions), linear probe and k-NN, with the from-scratch "
        "baseline (its lr chosen on validation). Every cell is an ordinary run directory under "
        "out/ and a small JSON result under results/cells/; finished cells are read back, "
        "never recomputed, so a killed study continues where it stopped. Writes table.md, "
        "table.json, accuracy.png and curves.png to results/.",
    )
    _add_config_args(p)
    p.add_argument("--jobs", type=int, default=1, help="cells run at the same time (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per cell (OMP_NUM_THREADS; default: torch's)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells, which are done and the commands; run nothing")  # fmt: skip
    p.add_argument("--report", action="store_true",
                   help="only write the table and plots from the results there are")  # fmt: skip
    p.add_argument("--executor", default="local", choices=["local", "slurm", "debug"],
                   help="local processes, or one SLURM job per cell through submitit "
                   "(pip install 'mimkit[cluster]'); debug: submitit in this process")  # fmt: skip
    p.add_argument("--slurm", nargs="*", metavar="KEY=VALUE",
                   help="submitit parameters for --executor slurm, e.g. slurm_partition=gpu "
                   "timeout_min=600 gpus_per_node=1 cpus_per_task=8")  # fmt: skip
    p.add_argument("--only", nargs="*", metavar="PREFIX",
                   help="run only the cells whose id starts with one of these "
                   "(e.g. pretrain/ or finetune/blockwise_)")  # fmt: skip
    p.set_defaults(func=_cmd_study)

    from mimkit.commands.interop import add_convert_parser, add_inspect_parser

    add_convert_parser(sub)  # mimkit convert

    p = sub.add_parser(
        "config", help="print a resolved recipe", description="Validate a recipe with its "
        "overrides and print the resolved config (presets, the absolute lr and, downstream, the "
        "architecture of model.init filled in)."
    )  # fmt: skip
    _add_config_args(p)
    p.add_argument(
        "--kind",
        default="auto",
        choices=[
            "auto",
            "pretrain",
            "tokenizer",
            "finetune",
            "linprobe",
            "knn",
            "segment",
            "detect",
        ],
        help="the command the recipe is for (auto: the recipe's folder name under configs/, "
        "else pretrain)",
    )
    p.set_defaults(func=_cmd_config)
    add_inspect_parser(sub)  # mimkit inspect
    from mimkit.commands.data import add_data_parser

    add_data_parser(sub)  # mimkit data shard | verify
    return parser


@contextlib.contextmanager
def _stdout_on_rank0() -> Iterator[None]:
    """Under torchrun, only rank 0 prints its reports (as the official MAE/BEiT code); the
    other ranks' errors and warnings still reach stderr."""
    if os.environ.get("RANK", "0") == "0":  # torchrun's; read before PyTorch is imported
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(x.startswith("-") for x in extra):
        # overrides after a flag (`--resume train.max_steps=500`): argparse closed the
        # positional list at the flag; the order of flags and overrides does not matter
        args.overrides = [*(args.overrides or []), *extra]
    elif extra and args.command == "convert" and not any(x.startswith("-") for x in extra):
        args.paths += extra  # IN/OUT after an option: `convert dalle --trust-pickle IN OUT`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    succeeded = False
    try:
        with _stdout_on_rank0():
            code = args.func(args)
        succeeded = True
        return code
    except ConfigError as err:
        print(f"mimkit: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"mimkit: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # images that cannot be decoded (strict mode, over the limit)
        from mimkit.data.datasets import BadImageError

        if not isinstance(err, BadImageError):
            raise
        # from a loader worker the message carries the worker's traceback: its last line
        print(f"mimkit: error: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a corrupt checkpoint or a non-finite loss: said, not traced
        from mimkit.engine.checkpoint import CorruptCheckpointError
        from mimkit.engine.trainer import NonFiniteLossError

        if not isinstance(err, CorruptCheckpointError | NonFiniteLossError):
            raise
        print(f"mimkit: error: {err}", file=sys.stderr)
        return 3 if isinstance(err, CorruptCheckpointError) else 4
    except KeyboardInterrupt:
        print("mimkit: interrupted", file=sys.stderr)
        return 130
    finally:
        # leave torchrun's process group, if this command joined one: after a success, every
        # rank leaves together (a failed rank is ended by torchrun, which stops the others)
        if "mimkit.engine.distributed" in sys.modules:  # nothing to leave before torch
            from mimkit.engine.distributed import shutdown

            shutdown(wait=succeeded)


if __name__ == "__main__":
    sys.exit(main())
