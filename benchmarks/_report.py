"""What every benchmark does with its result: print it and, if asked, write it as JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def hardware() -> dict[str, Any]:
    """The machine a figure was measured on: CPU model, cores this process may use, GPU name if any."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def emit(result: dict[str, Any], out: Path | None) -> None:
    """Print ``result`` as JSON and write it to ``out`` (folders created) when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
