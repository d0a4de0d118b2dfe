"""The first GPU session's check, one script under 8 minutes: does the GPU path work, how fast, and where does it wait?

    .venv/bin/python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--data-root ROOT]
    .venv/bin/python benchmarks/gpu_check.py --dry-run     # the same checks on the CPU, tiny sizes, a temp folder

Checks, each in its own process (a crash or a hang in one is recorded, the others still run), each with a time limit:

1. ``preflight``: torch, its CUDA build, the driver, what :func:`mtanet.train.preflight.cuda_diagnosis` says.
2. ``train_workers_<N>``: a 50-step run of the gpu profile's recipe (SE-ResNet-50, 112 px, global batch 256, bf16,
   channels-last, the packed cache, uint8 batches finished on the GPU) at two loader worker counts: images per
   second (whole run, and the steady windows of ``log.jsonl`` after the first), the share of the loop spent
   waiting for data. The first runs with ``torch.cuda.set_sync_debug_mode("warn")`` and counts the synchronisations
   inside training steps (expected: 0; logging steps and validation do synchronise).
3. ``deterministic``: two 10-step runs with ``deterministic: true``: same weights? which ops warned that they have
   no deterministic CUDA kernel?
4. ``resume_narrower``: a run killed (SIGKILL) after its step-10 checkpoint with every GPU visible, resumed to the
   end with ``CUDA_VISIBLE_DEVICES=0``.
5. ``torchrun_2gpu``: 20 steps on two GPUs under ``torchrun`` when two exist (global-batch losses, NCCL).
6. ``predict_cuda``: the CUDA test of ``mtanet predict``
   (``tests/test_predict.py::test_a_requested_gpu_is_really_used``).

Writes ``benchmarks/results/gpu_check.json`` and ``benchmarks/results/gpu_check.md`` (the performance page's GPU
section, also put into ``book/performance.md`` between its ``gpu-check`` markers). ``--dry-run`` runs every check
on the CPU with the smoke set, a small backbone at 32 px and a few steps, in a temporary folder (its JSON goes there
unless ``--out`` is given); the test suite runs it (tests/test_gpu_path.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARK_BEGIN, MARK_END = "<!-- gpu-check: begin -->", "<!-- gpu-check: end -->"

# One training run in its own process: what the checks above ask of it, and what it measured.
DRIVER = r'''
import hashlib, json, os, signal, sys, time, warnings
from pathlib import Path

import torch

from mtanet.train import Trainer

args = json.loads(Path(sys.argv[1]).read_text())
record = {"steps": 0, "syncs_in_steps": 0, "sync_examples": [], "warnings": []}
if args["sync_debug"] and torch.cuda.is_available():
    torch.cuda.set_sync_debug_mode("warn")
real_step, real_save = Trainer._train_step, Trainer._save_checkpoint


def counted_step(self, *a, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        real_step(self, *a, **kw)
    record["steps"] += 1
    for w in caught:
        text = str(w.message)
        if "synchroniz" in text.lower():
            record["syncs_in_steps"] += 1
            if len(record["sync_examples"]) < 5:
                record["sync_examples"].append(f"step {self.step + 1}: {text[:300]}")
        elif text[:200] not in record["warnings"]:
            record["warnings"].append(text[:200])


def save_then_maybe_die(self):
    real_save(self)
    if args.get("kill_after_step") == self.step:
        os.kill(os.getpid(), signal.SIGKILL)  # as a crash would: the resume must start from this checkpoint


Trainer._train_step, Trainer._save_checkpoint = counted_step, save_then_maybe_die
started = time.perf_counter()
trainer = Trainer(args["config"])
try:
    metrics = trainer.run()
    if trainer.dist.main:
        digest = hashlib.sha256()
        for tensor in trainer.model.state_dict().values():
            digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        record["weights_sha256"] = digest.hexdigest()
finally:
    trainer.close()
if args["sync_debug"] and torch.cuda.is_available():
    torch.cuda.set_sync_debug_mode(0)
record["seconds"] = time.perf_counter() - started
record["metrics"] = {k: metrics.get(k) for k in ("images_per_s", "data_wait_share", "steps", "hardware", "ddp",
                                                 "wall_time_s", "pretrained")}
if int(os.environ.get("RANK", "0")) == 0:
    Path(args["result"]).write_text(json.dumps(record, default=str))
'''


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """``cmd``'s exit status, the tail of its output and its seconds; a timeout is status 124."""
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                              capture_output=True, text=True, timeout=timeout)
        return done.returncode, (done.stdout + done.stderr)[-3000:], time.perf_counter() - started
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"") + (err.stderr or b"")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        return 124, out[-3000:], time.perf_counter() - started


class Check:
    """The runs of one invocation: sizes, folders, and the training configs they share."""

    def __init__(self, work: Path, data_root: Path, dry: bool, cuda: bool, gpus: int):
        self.work, self.data_root, self.dry, self.cuda, self.gpus = work, data_root, dry, cuda, gpus
        self.driver = work / "driver.py"
        self.driver.write_text(DRIVER)
        self.limit = 90 if dry else 240  # seconds per run

    def config(self, name: str, steps: int, **changes: Any) -> dict[str, Any]:
        if self.dry:  # the CPU stand-in: the smoke set, a small backbone, a few steps
            base = dict(backbone="seresnet18", image_size=32, batch_size=8, feature_dim=64, device="cpu",
                        device_augment=True, threads=1, eval_batch_size=64)
        else:  # the gpu profile's recipe (notebooks/params/04_training/gpu.yaml)
            base = dict(backbone="senet50", image_size=112, batch_size=256, device="cuda")
        return {**base, "data_root": str(self.data_root), "steps_per_epoch": steps, "stage1_epochs": 1,
                "stage2_epochs": 0, "log_every": max(1, steps // 5), "checkpoint_every": 0, "progress": False,
                "cache_dir": str(self.work / "cache"), "output_dir": str(self.work / name), **changes}

    def train(self, name: str, config: dict[str, Any], *, sync_debug: bool = False, kill_after_step: int | None = None,
              env: dict[str, str] | None = None, torchrun: int = 0) -> dict[str, Any]:
        args = self.work / f"{name}.json"
        result = self.work / f"{name}-result.json"
        result.unlink(missing_ok=True)
        args.write_text(json.dumps({"config": config, "sync_debug": sync_debug, "kill_after_step": kill_after_step,
                                    "result": str(result)}))
        cmd = [sys.executable, str(self.driver), str(args)]
        if torchrun:
            cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node",
                   str(torchrun), str(self.driver), str(args)]
        rc, tail, seconds = run(cmd, self.limit, env)
        out: dict[str, Any] = {"returncode": rc, "seconds": round(seconds, 1)}
        if result.exists():
            out.update(json.loads(result.read_text()))
        log = Path(config["output_dir"]) / "log.jsonl"
        if log.exists():
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            steady = sorted(r["images_per_s"] for r in rows if r.get("kind") == "step")[1:] or [None]
            out["steady_images_per_s"] = steady[len(steady) // 2]  # median of the windows after the first
        if rc not in (0, -9) and not result.exists():
            out["output_tail"] = tail
        return out


def check_preflight() -> dict[str, Any]:
    import torch

    from mtanet.train.preflight import cuda_diagnosis, driver_cuda_version, driver_version

    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "driver": driver_version(),
            "driver_supports_cuda": ".".join(map(str, driver_cuda_version() or ())) or None,
            "cuda_available": torch.cuda.is_available(), "diagnosis": cuda_diagnosis(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "cores": len(os.sched_getaffinity(0))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every check on the CPU, tiny sizes, a temp folder")
    parser.add_argument("--data-root", type=Path, help="a synthetic (or real) root; default: the smoke twin, written")
    parser.add_argument("--out", type=Path, help="the JSON (default: benchmarks/results/gpu_check.json; with "
                                                 "--dry-run, inside the temporary folder)")
    parser.add_argument("--steps", type=int, default=50, help="steps of each throughput run (default 50)")
    args = parser.parse_args(argv)

    import torch

    from mtanet.train.trainer import default_workers

    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.dry_run
    gpus = torch.cuda.device_count() if cuda else 0
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        results: dict[str, Any] = {"dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                   "preflight": check_preflight()}
        if not cuda and not args.dry_run:
            results["error"] = "no usable GPU: " + str(results["preflight"]["diagnosis"])
            return finish(results, args.out or HERE / "results" / "gpu_check.json", started, write_page=False)
        data_root = args.data_root
        if data_root is None:
            from mtanet.synth import write_synth

            data_root = work / "synth-smoke"
            write_synth(data_root, "smoke", workers=min(8, len(os.sched_getaffinity(0))))
        check = Check(work, data_root, args.dry_run, cuda, gpus)
        steps = 6 if args.dry_run else args.steps

        cores = max(1, len(os.sched_getaffinity(0)))
        most = default_workers(cores, True)  # what the trainer picks on a GPU, and half of it
        workers = sorted({most, most // 2}, reverse=True)
        for i, n in enumerate(workers):
            results[f"train_workers_{n}"] = check.train(f"workers{n}", check.config(f"workers{n}", steps,
                                                                                       num_workers=n),
                                                        sync_debug=i == 0)

        runs = [check.train(f"det{i}", check.config(f"det{i}", 4 if args.dry_run else 10, deterministic=True))
                for i in range(2)]
        results["deterministic"] = {"same_weights": runs[0].get("weights_sha256") is not None
                                    and runs[0].get("weights_sha256") == runs[1].get("weights_sha256"),
                                    "warnings": sorted(set(runs[0].get("warnings", []))),
                                    "returncodes": [r["returncode"] for r in runs]}

        resume = check.config("resume", 4 if args.dry_run else 20, checkpoint_every=2 if args.dry_run else 10)
        killed = check.train("resume", resume, kill_after_step=resume["checkpoint_every"])
        narrower = {"CUDA_VISIBLE_DEVICES": "0"} if cuda else {}
        resumed = check.train("resume", {**resume, "resume": True}, env=narrower)
        results["resume_narrower"] = {"gpus_at_save": gpus, "visible_at_resume": 1 if cuda else 0,
                                      "killed_returncode": killed["returncode"],
                                      "resumed_returncode": resumed["returncode"],
                                      "resumed_steps": (resumed.get("metrics") or {}).get("steps"),
                                      "note": None if gpus > 1 else "one GPU (or none): nothing narrower to hide"}

        if gpus >= 2 or args.dry_run:  # the dry run checks the path with two gloo processes on the CPU
            results["torchrun_2gpu"] = check.train("ddp", check.config("ddp", 4 if args.dry_run else 20),
                                                   torchrun=2)
        else:
            results["torchrun_2gpu"] = {"skipped": f"{gpus} GPU(s) here, two needed"}

        rc, tail, seconds = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 "tests/test_predict.py::test_a_requested_gpu_is_really_used"], 300)
        results["predict_cuda"] = {"returncode": rc, "seconds": round(seconds, 1), "summary": tail.strip()[-300:]}
        out = args.out or (work / "results" / "gpu_check.json" if args.dry_run else HERE / "results" /
                           "gpu_check.json")
        return finish(results, out, started, write_page=not args.dry_run)


def summary_markdown(results: dict[str, Any]) -> str:
    """The performance page's GPU section from a results dict."""
    pre = results["preflight"]
    lines = [f"## The GPU check (`benchmarks/gpu_check.py`, {results['date']})", "",
             f"{', '.join(pre['gpus']) or 'no GPU'}; torch {pre['torch']} (CUDA {pre['torch_cuda']}), driver "
             f"{pre['driver']} (CUDA {pre['driver_supports_cuda']}), {pre['cores']} cores; "
             f"{results['wall_time_s']:.0f} s in all.", ""]
    if results.get("error"):
        return "\n".join([*lines, results["error"], ""])
    lines += ["| run | images/s (steady) | images/s (whole run) | data-wait share | syncs inside steps |",
              "| --- | --- | --- | --- | --- |"]
    for key, value in results.items():
        if key.startswith("train_workers_") or key == "torchrun_2gpu":
            metrics = value.get("metrics") or {}
            wait = metrics.get("data_wait_share")
            lines.append(f"| {key} | {value.get('steady_images_per_s') or '-'} | {metrics.get('images_per_s') or '-'} "
                         f"| {'-' if wait is None else f'{wait:.3f}'} | {value.get('syncs_in_steps', '-')} |")
    det, res = results["deterministic"], results["resume_narrower"]
    lines += ["", f"Deterministic mode: same weights in two runs: {det['same_weights']}; ops that warned: "
                  f"{'; '.join(det['warnings']) or 'none'}.",
              f"Resume with fewer visible GPUs: killed {res['killed_returncode']}, resumed {res['resumed_returncode']}"
              f" ({res['note'] or 'CUDA_VISIBLE_DEVICES=0'}). CUDA predict test: exit "
              f"{results['predict_cuda']['returncode']}.",
              ""]
    return "\n".join(lines)


def finish(results: dict[str, Any], out: Path, started: float, *, write_page: bool) -> int:
    results["wall_time_s"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    text = summary_markdown(results)
    out.with_suffix(".md").write_text(text)
    if write_page:
        page = ROOT / "book" / "performance.md"
        old = page.read_text()
        section = f"{MARK_BEGIN}\n{text}\n{MARK_END}"
        if MARK_BEGIN in old and MARK_END in old:
            new = old[:old.index(MARK_BEGIN)] + section + old[old.index(MARK_END) + len(MARK_END):]
        else:
            new = old.rstrip("\n") + "\n\n" + section + "\n"
        page.write_text(new)
    print(text)
    print(f"gpu_check: {results['wall_time_s']:.0f} s; {out}")
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("returncode") not in (None, 0)]
    return 1 if failed or results.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
