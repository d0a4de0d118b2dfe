"""Command line: ``mtanet synth``, ``mtanet inspect``, and the subcommands of :mod:`mtanet.cli.train` (train,
evaluate) and :mod:`mtanet.cli.predict` (predict, export).

The only modules of the package that import :mod:`argparse`. Every error a user can fix (:class:`mtanet.errors.
MtanetError`, the file-system errors of the standard library such as a full disk or a missing permission, and a
mistyped option) is printed as one line, ``mtanet: error: ...``, with exit code 2; ``mtanet --debug ...`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

from mtanet.cli import predict as cli_predict
from mtanet.cli import train as cli_train
from mtanet.data import SPLITS, read_split
from mtanet.errors import MtanetError
from mtanet.synth import CEILING_FILE, DEFAULT_SIZE, SIZES, write_synth


def _synth(args: argparse.Namespace) -> int:
    manifest = write_synth(args.root, args.size, seed=args.seed, workers=args.workers, overwrite=args.overwrite)
    print(json.dumps(manifest, indent=2))
    splits = json.loads((Path(args.root) / CEILING_FILE).read_text())["splits"]
    for split, bounds in splits.items():
        print(f"{split}: reference (noise-free labels vs annotations)",
              {k: round(v, 3) for k, v in bounds["reference_score"].items()},
              "floor (best constant)", {k: round(v, 3) for k, v in bounds["floor_score"].items()})
    return 0


def _inspect(args: argparse.Namespace) -> int:
    for split in SPLITS:
        table = read_split(args.root, split, allow_cross_task_leak=args.allow_cross_task_leak,
                           verify_images=args.verify_images)
        f = table.frames
        print(f"{split}: edition {table.edition.name}, {f['name'].nunique()} names, {len(f)} frames, "
              f"{(f['image'] != '').sum()} with images")
        print(table.report)
    return 0


#: What to do about a file-system error, by its errno.
_OS_ADVICE = {
    errno.EACCES: "check the permissions of the file and of its folders, or choose another path",
    errno.EPERM: "check the permissions of the file and of its folders, or choose another path",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.ENOSPC: "the disk is full; free space or choose another output folder",
    errno.EDQUOT: "the disk quota is used up; free space or choose another output folder",
    errno.EISDIR: "this is a folder where a file is needed; give a file path",
    errno.ENOTDIR: "a part of this path is a file where a folder is needed",
    errno.EEXIST: "a file is where a folder is needed; choose another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EIO: "the disk or the file system failed; check the device",
}


def error_line(err: MtanetError | OSError) -> str:
    """The one line ``mtanet: error: ...`` of an error a user can fix: an :class:`~mtanet.errors.MtanetError` (its
    message names the file or option and what to do) or an :class:`OSError` (a file-system error, named with its
    file and followed by what to do)."""
    text = str(err)
    if isinstance(err, OSError) and err.errno is not None and err.strerror:  # raised by the OS, not a message of ours
        where = f"{os.fsdecode(err.filename)}: " if err.filename is not None else ""
        advice = _OS_ADVICE.get(err.errno)
        text = f"{where}{err.strerror}" + (f" ({advice})" if advice else "")
    return "mtanet: error: " + re.sub(r"\s*\n\s*", " ", text.strip())


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors (an unknown option, a value of the wrong type) are one line too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"mtanet: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="mtanet", description="MTANet: multi-task facial affect recognition")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of the one-line message")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic Aff-Wild2 twin (ABAW 2020 layout)")
    p.add_argument("root", type=Path, help="folder to write (created)")
    p.add_argument("--size", default=DEFAULT_SIZE, choices=list(SIZES),
                   help="; ".join(f"{name}: {size.purpose}" for name, size in SIZES.items()))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core, at most 8)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a synthetic dataset of other settings at ROOT (only a folder mtanet synth wrote; "
                        "any other folder is refused and nothing deleted)")
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
    except (MtanetError, OSError) as err:
        if args.debug:
            raise
        print(error_line(err), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
