"""Exported models (core/export): the peak memory of the exported ONNX graph for large random banks, and
(``predict``) the prediction lines of ``experiments.benchmarks.export_speed`` on the bench workload alone.

``make bench`` runs ``export_speed.bench_exported`` (``--skip export`` leaves it out). The memory figures of
docs/deployment.md come from ``python -m experiments.benchmarks.export_bench memory`` (32k and 320k rows):
every measurement runs in a fresh subprocess, whose ``ru_maxrss`` is the peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from core.backbones import EfficientNetLite
from core.export import export_model
from core.export.graph import DEFAULT_CHUNK
from core.features import PatchEmbedder
from core.patchcore import PatchCore
from core.search import MemoryBank, ReferenceSearch
from experiments.benchmarks.export_speed import bench_exported
from experiments.benchmarks.recording import Recorder

# One measurement in a fresh interpreter: session (or compiled model) creation, then one run; prints JSON.
_MEASURE = r"""
import json, resource, sys, time
import numpy as np
path, runtime, batch, size, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
prepack = sys.argv[6] == "1"
def peak():  # VmHWM: this process's own high-water mark (ru_maxrss keeps the forking parent's across exec)
    try:
        line = next(row for row in open("/proc/self/status") if row.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start_mb = peak()
if runtime == "onnx":
    import onnxruntime
    options = onnxruntime.SessionOptions()
    if not prepack:  # as core.export.runtime.ExportedModel runs it
        options.add_session_config_entry("session.disable_prepacking", "1")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    run = lambda x: session.run(None, {"images": x})
else:
    import openvino
    compiled = openvino.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    run = lambda x: compiled(x)
loaded_mb = peak()
images = (np.random.default_rng(0).random((batch, 3, size, size)) * 255).astype(dtype)
start = time.perf_counter()
run(images)
seconds = time.perf_counter() - start
print(json.dumps({"start_mb": start_mb, "loaded_peak_mb": loaded_mb, "run_peak_mb": peak(), "seconds": seconds}))
"""


def measure_in_subprocess(path: Path, runtime: str = "onnx", batch: int = 1, size: int = 224,
                          dtype: str = "uint8", prepack: bool = False, timeout: float = 1800) -> dict:
    """Peak RSS (MB) of a fresh process after loading ``path`` and after one run on ``batch`` random images;
    ``prepack``: ONNX Runtime's default of keeping a prepacked copy of every matrix-product constant (the
    bank, once more), which ``ExportedModel`` turns off."""
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(path), runtime, str(batch), str(size), dtype,
                             "1" if prepack else "0"],
                            capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"measuring {path} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def random_bank_model(bank_size: int, dim: int = 1024, image_size: int = 224, extractor=None,
                      embedder: PatchEmbedder | None = None, seed: int = 0) -> PatchCore:
    """A PatchCore (EfficientNet-Lite0 by default) whose bank is ``bank_size`` random rows: what export sees
    of a fitted model, without fitting one."""
    model = PatchCore(extractor or EfficientNetLite(), embedder or PatchEmbedder(embed_dim=dim), progress=False)
    generator = torch.Generator().manual_seed(seed)
    model.bank = MemoryBank().build(torch.randn(bank_size, dim, generator=generator), ReferenceSearch())
    model.input_size = (image_size, image_size)
    with torch.no_grad():
        _, model.grid = model.embed(torch.zeros(1, 3, image_size, image_size))
    return model


def memory(bank_sizes: tuple[int, ...] = (32768, 327680), chunk: int = DEFAULT_CHUNK, dim: int = 1024) -> list[dict]:
    """Peak RSS of the exported graph under ONNX Runtime (one 224 px image), chunked and unchunked."""
    lines = []
    with tempfile.TemporaryDirectory(prefix="export-memory-") as tmp:
        for bank_size in bank_sizes:
            model = random_bank_model(bank_size, dim)
            patches = model.grid[0] * model.grid[1]
            for label, rows, prepack in (("chunked", chunk, False), ("chunked, ORT prepacking on", chunk, True),
                                         ("unchunked (one chunk)", bank_size, False)):
                out = Path(tmp) / f"{bank_size}-{rows}"
                if not out.exists():
                    export_model(model, out, "onnx", chunk=rows)
                figures = measure_in_subprocess(out / "model.onnx", prepack=prepack)
                line = {"bank_size": bank_size, "dim": dim, "patches": patches, "chunk": min(rows, bank_size),
                        "variant": label, "bank_mb": round(bank_size * dim * 4 / 2**20, 1),
                        "distance_block_mb": round(patches * min(rows, bank_size) * 4 / 2**20, 1),
                        **{key: round(value, 3 if key == "seconds" else 1) for key, value in figures.items()}}
                print(json.dumps(line), flush=True)
                lines.append(line)
    return lines


def predict_alone(root: Path, images: int) -> None:
    """``bench_exported`` on the bench workload's default model (official aggregation, squared distances,
    10% coreset of ``images`` training images) without the rest of ``make bench``."""
    from experiments.benchmarks.workload import RATIO, loaders, new_model, textures

    extractor = EfficientNetLite().eval()
    dataset = textures(root, images)
    train, test = loaders(dataset, extractor)
    model = new_model(extractor, RATIO, None, "official")
    model.fit(train)
    bench_exported(Recorder(root / "export"), model, test, [sample.path for sample in train.dataset.samples],
                   aggregation="official")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="exported models: peak memory for large random banks (memory), "
                                                 "prediction speed on the bench workload (predict)")
    parser.add_argument("what", choices=["memory", "predict"])
    parser.add_argument("--banks", type=int, nargs="*", default=[32768, 327680])
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK)
    parser.add_argument("--images", type=int, default=411, help="predict: training images (make bench: 411)")
    parser.add_argument("--root", type=Path, default=Path("outputs") / "bench")
    args = parser.parse_args(argv)
    if args.what == "memory":
        memory(tuple(args.banks), args.chunk)
    else:
        predict_alone(args.root, args.images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
