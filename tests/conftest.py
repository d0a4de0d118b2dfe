"""Shared fixtures: tiny hand-made Aff-Wild2 roots and the smoke-size synthetic set (built once per session)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Tests are deterministic and must not fight over 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def jpeg_bytes(seed: int = 0, size: int = 112) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


class RootBuilder:
    """Writes an Aff-Wild2-shaped root file by file, so each test states exactly what is on disk."""

    def __init__(self, root: Path, edition: str = "2020"):
        self.root = root
        self.edition = edition
        from mtanet.tasks import EDITIONS

        self.ed = EDITIONS[edition]

    def annotation(self, task: str, split: str, name: str, text: str | bytes) -> Path:
        folder = self.root / "annotations" / self.ed.task_dirs[task] / self.ed.split_dirs[split]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.txt"
        if isinstance(text, str):
            path.write_text(text, newline="")
        else:
            path.write_bytes(text)
        return path

    def images(self, name: str, frames: list[int], data: bytes | None = None) -> Path:
        folder = self.root / "cropped_aligned" / name
        folder.mkdir(parents=True, exist_ok=True)
        for f in frames:
            (folder / f"{f:05d}.jpg").write_bytes(data if data is not None else jpeg_bytes(f))
        return folder


@pytest.fixture
def builder(tmp_path: Path) -> RootBuilder:
    return RootBuilder(tmp_path / "affwild2")


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke-size synthetic dataset, written once for the whole session."""
    from mtanet.synth import write_synth

    root = tmp_path_factory.mktemp("synth") / "synth-smoke"
    write_synth(root, "smoke", seed=0, workers=2)
    return root
