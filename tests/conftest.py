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


class Damage:
    """Damage a model file on disk the ways issue 15 met it: bytes flipped inside a weight (the container stays
    readable, so only a digest can tell), a truncated file, an empty file."""

    @staticmethod
    def flip_checkpoint_tensor(path: Path, n: int = 4096) -> str:
        """Invert ``n`` bytes in the middle of the largest tensor record of a ``torch.save`` zip (stored, not
        compressed, so the bytes are the tensor's); returns the record's name. ``torch.load`` still reads the file:
        it does not check the zip's CRCs."""
        import struct
        import zipfile

        with zipfile.ZipFile(path) as zf:
            info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        assert info.compress_type == zipfile.ZIP_STORED and info.file_size >= 2 * n
        with open(path, "r+b") as f:
            f.seek(info.header_offset)
            header = f.read(30)  # the local file header: its name and extra field precede the data
            start = info.header_offset + 30 + sum(struct.unpack("<HH", header[26:30]))
            f.seek(start + info.file_size // 2)
            chunk = f.read(n)
            f.seek(start + info.file_size // 2)
            f.write(bytes(b ^ 0xFF for b in chunk))
        return info.filename

    @staticmethod
    def flip_onnx_initializer(path: Path, n: int = 4096) -> str:
        """Invert ``n`` bytes in the middle of the largest initializer's raw data of an ONNX file (the protobuf
        stays parseable); returns the initializer's name."""
        import onnx

        init = max(onnx.load(str(path)).graph.initializer, key=lambda t: len(t.raw_data))
        assert len(init.raw_data) >= 2 * n
        data = bytearray(path.read_bytes())
        at = data.index(init.raw_data) + len(init.raw_data) // 2
        data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
        path.write_bytes(bytes(data))
        return init.name

    @staticmethod
    def truncate(path: Path, keep: float = 0.5) -> None:
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])

    @staticmethod
    def empty(path: Path) -> None:
        path.write_bytes(b"")


@pytest.fixture
def damage() -> Damage:
    return Damage()


def folder_state(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file below ``folder`` with its size, mtime and bytes: equal before and after a refused command."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def snapshot():
    return folder_state
