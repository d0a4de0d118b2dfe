"""``mtanet train`` and ``mtanet evaluate``.

``mtanet train [--config cfg.yaml] [--<field> VALUE ...] [--set key=value ...] [--resume] -o OUTPUT_DIR``: every
:class:`~mtanet.train.TrainConfig` field is a flag (``--batch-size 32``; a stage's fields as ``--stage1-lr 1e-3``;
booleans: ``--augment`` or ``--augment false``); precedence: defaults < ``--config`` < flags < ``--set``. With
``--resume`` and an existing run, the run's ``config.json`` is the base instead of the defaults. Under ``torchrun
--nproc_per_node N`` the same command trains on N processes.

``mtanet evaluate CHECKPOINT [--data-root PATH] [--split val|train|test] [--names LIST] -o OUT``: see
:func:`mtanet.evaluate.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

from mtanet.errors import ConfigError
from mtanet.evaluate import evaluate
from mtanet.runtime import check_output_folder
from mtanet.train import CONFIG_FILE, StageConfig, TrainConfig, train, trainer
from mtanet.train.config import read_yaml_mapping

__all__ = ["add_parsers"]


def _flags() -> list[tuple[str, str, Any, bool]]:
    """``(key, help, default, is_bool)`` of every key the command line sets: fields, then the stages' fields."""
    out = []
    for name, field in TrainConfig.model_fields.items():
        if name in ("stage1", "stage2"):
            default: StageConfig = field.default
            for sub, sub_field in StageConfig.model_fields.items():
                out.append((f"{name}_{sub}", f"{name}: {sub_field.description}", getattr(default, sub), False))
            continue
        default = field.default_factory() if field.default_factory is not None else field.default
        is_bool = bool in typing.get_args(field.annotation) or field.annotation is bool
        out.append((name, field.description or "", default, is_bool))
    return out


def add_parsers(subparsers) -> None:
    """Register ``mtanet train`` and ``mtanet evaluate``."""
    p = subparsers.add_parser("train", help="train MTANet (the paper's two-stage recipe)",
                              description=(trainer.__doc__ or "").split("\n\n")[0],
                              formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML file of TrainConfig fields")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="set any TrainConfig field (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    fields = p.add_argument_group("TrainConfig fields")
    for key, text, default, is_bool in _flags():
        flags = ["--" + key.replace("_", "-")] + (["-o"] if key == "output_dir" else [])
        # argparse formats help with %: a literal % must be doubled
        kwargs: dict[str, Any] = {"dest": f"field_{key}", "default": argparse.SUPPRESS,
                                  "help": f"{text} (default: {default})".replace("%", "%%")}
        if is_bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        else:
            kwargs["metavar"] = "VALUE"
        fields.add_argument(*flags, **kwargs)
    p.set_defaults(func=_train)

    p = subparsers.add_parser(
        "evaluate", help="score a checkpoint by its data's ABAW edition and write the challenge's submission files",
        description="Score CHECKPOINT on a split of DATA_ROOT by the rules of the root's ABAW edition (2020: "
                    "Table I's scores; 2021: the same on 12 AUs; 2022+: AU mean F1, expression macro-F1 over 8 "
                    "classes and their multi-task sum) and write the submission files with scores.json (edition, "
                    "scores, provenance). With --split test --names LIST: the submission of the listed test "
                    "videos from their cropped_aligned folders alone, no annotation needed; a frame without a jpg "
                    "(no face) takes the previous frame's prediction (the first face's before it), a video without "
                    "any face the training set's constants.")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data-root", default=None, help="Aff-Wild2 root (default: the training run's)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"],
                   help="split to score (test: from Test_Set annotations, or with --names without any)")
    p.add_argument("--names", type=Path, default=None, metavar="LIST",
                   help="with --split test: a text file of test video names, one per line (NAME or NAME,FRAMES; "
                        "FRAMES, the video's frame count, sets the lines per file, else the last jpg's number)")
    p.add_argument("--edition", default=None, choices=["2020", "2021", "2022"],
                   help="with --names on a root without annotations: the edition of the files (default: the "
                        "checkpoint's, else the one its heads fit)")
    p.add_argument("-o", "--output-dir", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None, help="default: the training run's")
    p.add_argument("--au-thresholds", default="saved", choices=["saved", "0.5"],
                   help="AU decision thresholds: the checkpoint's tuned ones, or 0.5")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_evaluate)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config the flags describe: defaults (or the resumed run's ``config.json``) < ``--config`` < flags <
    ``--set``."""
    values: dict[str, Any] = {}
    given = {k[len("field_"):]: v for k, v in vars(args).items() if k.startswith("field_")}
    out = given.get("output_dir")
    if str(given.get("resume", "false")).strip().lower() in ("true", "yes", "on", "1") and out \
            and (Path(out) / CONFIG_FILE).exists():
        values.update(json.loads((Path(out) / CONFIG_FILE).read_text()))
    if args.config:
        values.update(read_yaml_mapping(args.config))
    values.update(given)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        values[key.strip()] = value
    return TrainConfig.from_dict(values)


def _train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    check_output_folder(cfg.output_dir)  # a file in the way fails now, not after the data are read
    metrics = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"final": metrics["final_headline"], "best": metrics["best"],
                          "output_dir": cfg.output_dir}, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    check_output_folder(args.output_dir)  # a file in the way fails now, not after the predictions
    result = evaluate(args.checkpoint, data_root=args.data_root, split=args.split, output_dir=args.output_dir,
                      batch_size=args.batch_size, device=args.device, num_workers=args.num_workers,
                      threads=args.threads, au_thresholds=args.au_thresholds, image_size=args.image_size,
                      progress=not args.no_progress, names=args.names, edition=args.edition)
    if result["scores"] is None:  # a test list: files, no scores
        print(json.dumps({"edition": result["edition"], "names": len(result["names"]), "files": len(result["files"]),
                          "written": str(args.output_dir)}, indent=2), file=sys.stdout)
        return 0
    print(json.dumps({"edition": result["edition"], "scores": result["headline"],
                      "scores_all_frames": result["headline_all_frames"], "written": str(args.output_dir)},
                     indent=2), file=sys.stdout)
    return 0
