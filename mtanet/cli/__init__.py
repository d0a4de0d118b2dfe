"""Command line: ``mtanet synth``, ``mtanet inspect``, and the subcommands of :mod:`mtanet.cli.train` (train,
evaluate) and :mod:`mtanet.cli.predict` (predict, export).

The only modules of the package that import :mod:`argparse`. Every error a user can fix (:class:`mtanet.errors.
MtanetError` and the file errors of the standard library) is printed as one line, ``mtanet: error: ...``, with exit
code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mtanet.cli import predict as cli_predict
from mtanet.cli import train as cli_train
from mtanet.data import read_split
from mtanet.errors import MtanetError
from mtanet.synth import CEILING_FILE, DEFAULT_SIZE, SIZES, write_synth


def _synth(args: argparse.Namespace) -> int:
    manifest = write_synth(args.root, args.size, seed=args.seed, workers=args.workers, overwrite=args.overwrite)
    print(json.dumps(manifest, indent=2))
    ceiling = json.loads((Path(args.root) / CEILING_FILE).read_text())
    print("ceiling (latent vs annotations, val):", {k: round(v, 3) for k, v in ceiling["ceiling_score"].items()})
    print("best trivial predictor (val):        ", {k: round(v, 3) for k, v in ceiling["trivial_best"].items()})
    return 0


def _inspect(args: argparse.Namespace) -> int:
    for split in ("train", "val"):
        table = read_split(args.root, split, allow_cross_task_leak=args.allow_cross_task_leak,
                           verify_images=args.verify_images)
        f = table.frames
        print(f"{split}: edition {table.edition.name}, {f['name'].nunique()} names, {len(f)} frames, "
              f"{(f['image'] != '').sum()} with images")
        print(table.report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtanet", description="MTANet: multi-task facial affect recognition")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic Aff-Wild2 twin (ABAW 2020 layout)")
    p.add_argument("root", type=Path, help="folder to write (created)")
    p.add_argument("--size", default=DEFAULT_SIZE, choices=list(SIZES),
                   help="; ".join(f"{name}: {size.purpose}" for name, size in SIZES.items()))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core, at most 8)")
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset at ROOT")
    p.set_defaults(func=_synth)

    p = sub.add_parser("inspect", help="read an Aff-Wild2 root and print what was read and skipped")
    p.add_argument("root", type=Path)
    p.add_argument("--allow-cross-task-leak", action="store_true")
    p.add_argument("--verify-images", action="store_true", help="decode every jpg once")
    p.set_defaults(func=_inspect)

    cli_train.add_parsers(sub)
    cli_predict.add_parsers(sub)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (MtanetError, FileExistsError, FileNotFoundError) as err:
        print(f"mtanet: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
