"""loader_bench's transform rows: JPEG decode + random crop + flip in worker processes, and the raw hand-off.

Two workloads, written once (untimed):

- jpeg: ``count`` real 256x256 RGB JPEG files (quality 90, made with Pillow from smooth random gradients
  with noise, so they compress like photographs), stored as a ``binary`` column with an int label; the
  transform decodes each with Pillow, crops a random 224x224 window and flips it at random (numpy's global
  generator), returning ``{"image": uint8[224, 224, 3], "label": int}``;
- raw: ``raw_bytes`` of fixed-size 224x224x3 uint8 samples (``arrow.fixed_shape_tensor``), handed over as
  they are (no transform): what moving finished batches across processes costs.

Contenders, each with the same ``workers`` processes, batch 64, page cache warm, run in turn (an epoch of
each, then again, ``repeat`` times; the median): trainio ``Loader(StreamingDataset(...), 64, transform=...,
workers=N)`` (batches stacked by the workers into reused shared-memory slots), against a stock
``DataLoader(num_workers=N, persistent_workers=True)`` over the same StreamingDataset, the transform applied
per sample in its workers, the default collate. Images/s and GB/s of the batches handed over.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from trainio.loaders import DatasetWriter, Loader, StreamingDataset

BATCH = 64
CROP = 224


def make_jpegs(path: Path, count: int) -> None:
    """Write ``count`` 256x256 RGB JPEGs (quality 90) as a trainio dataset at ``path``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:256, 0:256].astype(np.float32) / 255
    with DatasetWriter(path, shard_bytes=64 << 20, batch_rows=256) as writer:
        for i in range(count):
            a, b, c = rng.random(3) * 2 - 1
            base = np.stack([x * a + y * b, x * b + y * c, x * c + y * a], axis=-1) * 127 + 128
            pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="JPEG", quality=90)
            writer.write({"jpeg": out.getvalue(), "label": i % 1000})


def make_raw(path: Path, nbytes: int) -> None:
    """Write about ``nbytes`` of fixed-size 224x224x3 uint8 samples as a trainio dataset at ``path``."""
    count = max(BATCH, nbytes // (CROP * CROP * 3))
    rng = np.random.default_rng(1)
    with DatasetWriter(path, shard_bytes=256 << 20, batch_rows=64) as writer:
        for start in range(0, count, 64):
            n = min(64, count - start)
            writer.write_batch({"image": rng.integers(0, 256, (n, CROP, CROP, 3), dtype=np.uint8)})


def decode_crop_flip(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode a JPEG, crop a random 224x224 window, flip it left-right half the time."""
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(sample["jpeg"])).convert("RGB"))
    top, left = np.random.randint(0, image.shape[0] - CROP + 1), np.random.randint(0, image.shape[1] - CROP + 1)
    crop = image[top:top + CROP, left:left + CROP]
    if np.random.random() < 0.5:
        crop = crop[:, ::-1]
    return {"image": np.ascontiguousarray(crop), "label": int(sample["label"])}


class Mapped(IterableDataset[dict[str, Any]]):
    """A StreamingDataset with a per-sample function applied, as a DataLoader's workers would run it."""

    def __init__(self, dataset: StreamingDataset, function: Callable[[dict[str, Any]], dict[str, Any]] | None):
        self.dataset, self.function = dataset, function

    def __iter__(self) -> Iterator[dict[str, Any]]:
        function = self.function
        for sample in self.dataset:
            yield function(sample) if function is not None else sample


def _epoch(batches: Iterable[dict[str, Any]]) -> tuple[float, int, int]:
    started = time.perf_counter()
    samples = nbytes = 0
    for batch in batches:
        image = batch["image"]
        samples += len(image)
        nbytes += image.numel() * image.element_size() if isinstance(image, torch.Tensor) else image.nbytes
    return time.perf_counter() - started, samples, nbytes


def rows(root: Path, workers: int, jpegs: int, raw_bytes: int, repeat: int) -> list[dict[str, Any]]:
    """Run both workloads' contenders in turn; one row per (workload, contender) with the medians."""
    torch.set_num_threads(1)
    make_jpegs(root / "jpeg", jpegs)
    make_raw(root / "raw", raw_bytes)
    found = []
    for workload, transform in (("jpeg", decode_crop_flip), ("raw", None)):
        path = root / workload
        ours = Loader(StreamingDataset(path, seed=0, batch_size=BATCH), BATCH, transform=transform,
                      workers=workers)
        theirs = DataLoader(Mapped(StreamingDataset(path, seed=0, batch_size=BATCH), transform),
                            batch_size=BATCH, num_workers=workers, persistent_workers=True,
                            multiprocessing_context="fork")
        contenders = {f"trainio Loader(transform=..., workers={workers})": ours,
                      f"torch DataLoader(num_workers={workers}), same transform": theirs}
        runs: dict[str, list[tuple[float, int, int]]] = {name: [] for name in contenders}
        for loader in contenders.values():
            _epoch(loader)  # warm-up: workers started, pages read
        for _ in range(repeat):
            for name, loader in contenders.items():
                runs[name].append(_epoch(loader))
        ours.close()
        for name, measured in runs.items():
            seconds = statistics.median(r[0] for r in measured)
            samples, nbytes = measured[0][1], measured[0][2]
            found.append({"workload": workload, "contender": name, "samples_per_s": samples / seconds,
                          "gb_per_s": nbytes / seconds / 1e9, "seconds": seconds})
    return found


def render(found: list[dict[str, Any]]) -> str:
    """The rows as a table, each workload's trainio row against its DataLoader row."""
    lines = ["| workload | contender | samples/s | GB/s handed over | vs DataLoader |", "|---|---|---|---|---|"]
    for row in found:
        base = next(r for r in found if r["workload"] == row["workload"] and "DataLoader" in r["contender"])
        lines.append(f"| {row['workload']} | {row['contender']} | {row['samples_per_s']:,.0f} | "
                     f"{row['gb_per_s']:.2f} | {row['samples_per_s'] / base['samples_per_s']:.2f}x |")
    return "\n".join(lines)
