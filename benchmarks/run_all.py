"""Every benchmark in one run (`make bench`): each figure as a ratio against its goal, measured side by side.

    .venv/bin/python benchmarks/run_all.py [--quick | --report-only]

Runs the scripts of this folder one after the other (each writes ``benchmarks/results/<name>.json``; the last,
``machine_speed.py``, says how fast this machine trains against the reference one), reads the book's and the tests'
recorded wall times (``book/_build/timings-*.json``, written by ``make book`` and
``make test``), prints one table of figure, value, goal and ratio, and writes it to
``benchmarks/results/summary.json`` and the book's performance page (``book/performance.md``).

Absolute times depend on the machine and on what else runs on it; compare the ratios across runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _report import hardware

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def run(script: str, *args: str, name: str | None = None) -> dict:
    out = RESULTS / f"{name or Path(script).stem}.json"
    cmd = [sys.executable, str(HERE / script), *args, "--out", str(out)]
    print(f"[bench] {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"[bench]   {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads(out.read_text())


def figures(train: dict, data: dict, predict: dict, memory: dict) -> list[dict]:
    """One row per figure: what, value, goal, ratio to the goal (>= 1 meets it), and the measurement behind it."""
    rows = []
    for r in train["results"]:
        rows.append({"figure": f"training step, {r['backbone']} at {r['image_size']} px: full / bare timm step",
                     "value": r["full_over_bare"], "goal": 0.9, "ratio": r["full_over_bare"] / 0.9,
                     "detail": f"best of {len(r['runs']['full'])} alternating repeats: full {r['full_images_per_s']} "
                               f"img/s, bare {r['bare_images_per_s']} img/s"
                               + (f" (median repeats: {r['median_full_over_bare']})" if "median_full_over_bare" in r
                                  else "") + f"; {r['data_wait_share']:.0%} of the loop waits for data"})
    for r in train["results"]:
        for kind in ("jpeg", "packed"):
            decode = data[f"{kind}_images_per_second"]
            rows.append({"figure": f"data: {kind} decode (1 thread) / consumption of the {r['backbone']} step",
                         "value": round(decode / r["full_images_per_s"], 2), "goal": 3.0,
                         "ratio": decode / r["full_images_per_s"] / 3.0,
                         "detail": f"{decode} img/s decoded vs {r['full_images_per_s']} img/s trained"})
    batches = data.get("training_batches")
    cpu_profile = next((r for r in train["results"] if batches and r["image_size"] == batches["image_size"]), None)
    if cpu_profile:
        rate = batches["images_per_second"]
        rows.append({"figure": f"data: the trainer's augmented batches at {batches['image_size']} px (packed, 1 thread) "
                               f"/ consumption of the {cpu_profile['backbone']} step",
                     "value": round(rate / cpu_profile["full_images_per_s"], 2), "goal": 3.0,
                     "ratio": rate / cpu_profile["full_images_per_s"] / 3.0,
                     "detail": f"{rate} img/s fetched vs {cpu_profile['full_images_per_s']} img/s trained"})
    best = predict["by_threads"][[r["threads"] for r in predict["by_threads"]].index(predict["best_threads"])]
    rows.append({"figure": f"inference: mtanet predict end to end, {predict['best_threads']} thread(s), frames/s",
                 "value": predict["best_end_to_end_fps"], "goal": 25.0,
                 "ratio": predict["best_end_to_end_fps"] / 25.0,
                 "detail": f"torch {best['end_to_end_fps']}, onnx {best.get('end_to_end_fps_onnx', '-')} frames/s; "
                           f"per frame (torch): decode {best['decode_ms']} ms, detection {best['detect_ms']} ms, "
                           f"alignment {best['align_ms']} ms, model {best['model_ms']} ms"})
    gpu = predict.get("gpu_model")
    rows.append({"figure": "inference: model batched on the GPU / on this CPU",
                 "value": round(gpu["gpu_over_cpu"], 1) if gpu else None, "goal": 20.0,
                 "ratio": gpu["gpu_over_cpu"] / 20.0 if gpu else None,
                 "detail": "no GPU on this machine" if not gpu else
                           f"{gpu['gpu_crops_per_s']:.0f} vs {gpu['cpu_crops_per_s']:.0f} crops/s"})
    frames = sorted(memory["frames"], key=int)
    rows.append({"figure": f"memory: peak RSS of mtanet predict, {frames[1]} / {frames[0]} frames",
                 "value": memory["ratio_10n_over_n"], "goal": 1.10, "ratio": 1.10 / memory["ratio_10n_over_n"],
                 "detail": f"{memory['frames'][frames[0]]['peak_rss_mb']} MB vs "
                           f"{memory['frames'][frames[1]]['peak_rss_mb']} MB"})
    return rows


def render_figure(render: dict) -> dict:
    """The synthetic set's face renderer against its goal (``synth_render.py``)."""
    rate, goal = render["faces_per_second"], render["goal_faces_per_second"]
    return {"figure": "synthetic data: faces rendered per second, one process", "value": rate, "goal": goal,
            "ratio": rate / goal, "detail": f"median of {render['repeats']} timings of {render['faces']} faces"}


def recorded_times() -> list[dict]:
    """The latest book and test wall times recorded in ``book/_build`` (what ``make book`` / ``make test`` wrote)."""
    rows = []
    for path in sorted((ROOT / "book" / "_build").glob("timings-*.json")):
        data = json.loads(path.read_text())
        if "make_test_seconds" in data:
            rows.append({"what": "make test", "seconds": data["make_test_seconds"], "date": data.get("date")})
            continue
        total = data.get("total_seconds")
        if total is None or set(data.get("notebooks", {})) != {p.stem for p in (ROOT / "notebooks").glob("[0-9]*.py")}:
            continue  # a build of some chapters only (make sweep, --only): not the book's wall time
        detail = ", ".join(f"{k} {v:.0f} s" for k, v in data.get("notebooks", {}).items())
        rows.append({"what": f"book chapters and HTML (no install, no data), profile {data['profile']}",
                     "seconds": total, "date": data.get("date"),
                     "detail": detail + (f", html {data['html_seconds']:.0f} s" if "html_seconds" in data else "")})
    return rows


def page(rows: list[dict], times: list[dict], hw: dict, date: str, seconds: float) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:g}" if isinstance(v, (int, float)) else str(v)

    lines = ["# Performance", "",
             f"Measured by `make bench` on {date}: {hw['cpu']}, {hw['cores']} cores"
             + (f", {hw['gpu']}" if hw.get("gpu") else ", no GPU") + f", torch {hw['torch']}; the whole run took "
             f"{seconds:.0f} s."
             + (f" This machine trains a bare timm step at {hw['speed_vs_reference']:g} times the speed of the "
                "reference machine the book's CPU budgets were sized on (`benchmarks/machine_speed.py`); the wall "
                "times below scale with its inverse." if hw.get("speed_vs_reference") else "")
             + " Each figure is a ratio measured side by side in one process, because these machines "
             "are shared and noisy; the goals come from the project's benchmark issue. A ratio to the goal of 1 or "
             "more meets it.", "",
             "| figure | value | goal | ratio to goal | measured |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['figure']} | {fmt(r['value'])} | {fmt(r['goal'])} | {ratio} | {r['detail']} |")
    lines += ["", "## Wall times of the book and the tests", "",
              "The latest runs recorded on the machine that ran `make bench` (from `book/_build/timings-*.json`).", ""]
    if times:
        lines += ["| run | seconds | date | split |", "|---|---|---|---|"]
        lines += [f"| {t['what']} | {fmt(t['seconds'])} | {t.get('date') or '-'} | {t.get('detail', '')} |"
                  for t in times]
    else:
        lines.append("None recorded yet: run `make book` and `make test` first.")
    lines += ["", ("The book rows leave out the install and the synthetic data; the README gives a fresh clone's "
                   "`make book` and `make test` with them. The JSON behind this page, with every raw measurement, is "
                   "in `benchmarks/results/`."), ""]
    # The GPU check (benchmarks/gpu_check.py) runs on another machine; keep its section between its markers.
    gpu, current = RESULTS / "gpu_check.md", ROOT / "book" / "performance.md"
    begin, end = "<!-- gpu-check: begin -->", "<!-- gpu-check: end -->"
    kept = current.read_text() if current.exists() else ""
    if gpu.exists():
        section = gpu.read_text().strip()
    elif begin in kept and end in kept:  # nothing measured here: the page's own section stays as it is
        section = kept.split(begin, 1)[1].split(end, 1)[0].strip()
    else:
        section = "## The GPU check\n\n`benchmarks/gpu_check.py` has not run on a GPU yet."
    lines += [begin, section, end, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and frames (a check, not a measurement)")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rebuild the table and the page from benchmarks/results/*.json and the "
                             "recorded wall times (e.g. after a new make book or make test)")
    args = parser.parse_args()
    if args.report_only:
        summary = json.loads((RESULTS / "summary.json").read_text())
        train = json.loads((RESULTS / "train_step_cpu_profile.json").read_text())
        train["results"] += json.loads((RESULTS / "train_step_paper.json").read_text())["results"]
        rows = figures(train, *(json.loads((RESULTS / f"{name}.json").read_text())
                                for name in ("data_loading", "predict_speed", "predict_memory")))
        if (RESULTS / "synth_render.json").exists():
            rows.append(render_figure(json.loads((RESULTS / "synth_render.json").read_text())))
        times = recorded_times()
        (RESULTS / "summary.json").write_text(json.dumps({**summary, "figures": rows, "recorded_times": times},
                                                         indent=2) + "\n")
        (ROOT / "book" / "performance.md").write_text(page(rows, times, summary["hardware"], summary["date"],
                                                           summary["seconds"]))
        print(f"book/performance.md rewritten from the results of {summary['date']}")
        return
    started = time.perf_counter()
    steps, frames = ("5", "40") if args.quick else ("60", "150")
    # the cpu profile's network with its image cache, and the paper's (timings start after 5 warm-up steps)
    train = run("train_step.py", "--backbone", "seresnet18_half", "--image-size", "64", "--steps", steps,
                "--repeats", "1" if args.quick else "5", "--cache-dir", str(ROOT / "runs" / "cache"),
                name="train_step_cpu_profile")
    big = run("train_step.py", "--backbone", "senet50", "--image-size", "112", "--steps", "5" if args.quick else "10",
              "--repeats", "1" if args.quick else "2", name="train_step_paper")
    train["results"] += big["results"]
    data = run("data_loading.py", "--n", "500" if args.quick else "2000")
    predict = run("predict_speed.py", "--frames", frames, "--onnx")
    memory = run("predict_memory.py", "--frames", "20" if args.quick else "60")
    render = run("synth_render.py", "--faces", "30" if args.quick else "60")
    speed = run("machine_speed.py", "--steps", "3" if args.quick else "8")
    rows = figures(train, data, predict, memory) + [render_figure(render)]
    times = recorded_times()
    seconds = time.perf_counter() - started
    hw, date = {**hardware(), "speed_vs_reference": speed["speed_vs_reference"]}, time.strftime("%Y-%m-%d")
    (RESULTS / "summary.json").write_text(json.dumps({"figures": rows, "recorded_times": times, "hardware": hw,
                                                      "date": date, "seconds": round(seconds)}, indent=2) + "\n")
    (ROOT / "book" / "performance.md").write_text(page(rows, times, hw, date, seconds))
    width = max(len(r["figure"]) for r in rows)
    print(f"\n{'figure':{width}}  {'value':>8}  {'goal':>6}  ratio")
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        value = "-" if r["value"] is None else f"{r['value']:g}"
        print(f"{r['figure']:{width}}  {value:>8}  {r['goal']:>6g}  {ratio}")
    for t in times:
        print(f"{t['what']}: {t['seconds']} s ({t.get('date')})")
    print(f"\nmake bench: {seconds:.0f} s; book/performance.md and benchmarks/results/summary.json written")


if __name__ == "__main__":
    main()
