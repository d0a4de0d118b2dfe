"""``python -m mtanet.book``: execute the chapters for a profile and render the book (what ``make book`` runs).

``--only 05_ablations --no-html`` executes one chapter alone (``make sweep``). ``--reference-sweep`` runs (or goes on
with) the committed reference sweep of the ablation chapter (:mod:`mtanet.book.reference`, ``make reference-sweep``);
a bad settings file gives one ``mtanet: error:`` line and exit code 2. ``--publish DIR`` executes nothing: it
copies the rendered HTML of the build folder to DIR, a self-contained site for any static host (``make publish``).
A failing cell, a missing parameter file, a failed HTML build or a folder that cannot be published to prints one
``[book] FAILED: ...`` line and exits with code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mtanet.book.build import PROFILES, build, publish
from mtanet.errors import MtanetError, NotebookFailed
from mtanet.runtime import project_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtanet.book",
                                     description="Build the book: py:percent notebooks -> papermill (per-profile "
                                                 "parameters) -> Jupyter Book HTML.")
    parser.add_argument("--profile", default=os.environ.get("PROFILE", "cpu"), choices=PROFILES)
    parser.add_argument("--build-dir", type=Path, default=None, help="default: book/_build")
    parser.add_argument("--only", nargs="*", help="notebook stems to execute (default: all)")
    parser.add_argument("--no-html", action="store_true", help="execute only, do not render")
    parser.add_argument("--publish", type=Path, metavar="DIR",
                        help="copy the book already rendered in the build folder to DIR (empty, missing, or an "
                             "earlier copy) for a static host; executes nothing")
    parser.add_argument("--reference-sweep", action="store_true",
                        help="run the committed ablation sweep (notebooks/params/05_ablations/reference.yaml) into "
                             "book/results/ablations-reference.json, resuming where it stopped; executes no chapter")
    parser.add_argument("--hours", type=float, default=0.0,
                        help="with --reference-sweep: start no run after this many hours (0: no limit)")
    parser.add_argument("--settings", type=Path, default=None, help="with --reference-sweep: another settings file")
    parser.add_argument("--output", type=Path, default=None, help="with --reference-sweep: another output file")
    args = parser.parse_args(argv)
    if args.reference_sweep:
        return _reference_sweep(args)
    try:
        if args.publish is not None:
            html = (args.build_dir or project_root() / "book" / "_build") / "html"
            print(f"[book] published {publish(html, args.publish)}")
            return 0
        build(args.profile, build_dir=args.build_dir, only=args.only, html=not args.no_html)
    except (NotebookFailed, MtanetError, RuntimeError, FileNotFoundError) as err:
        print(f"[book] FAILED: {err}", file=sys.stderr)
        return 1
    return 0


def _reference_sweep(args: argparse.Namespace) -> int:
    from mtanet.book import reference, sweep

    try:
        reference.run_reference(reference.settings(args.settings), args.output or project_root() / reference.OUTPUT,
                                hours=args.hours, log=lambda line: print(line, flush=True))
    except (MtanetError, NotebookFailed, sweep.SweepConflict, FileNotFoundError, ValueError) as err:
        print(f"mtanet: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
