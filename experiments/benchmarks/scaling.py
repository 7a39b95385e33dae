"""Cost vs training images, bank ratio and image size (default aggregation), and the fit buffer variants."""

from __future__ import annotations

from pathlib import Path

import torch

from experiments.benchmarks.fitting import fit_line, fitted
from experiments.benchmarks.prediction import predict_line
from experiments.benchmarks.recording import Recorder
from experiments.benchmarks.workload import RATIO, loaders, new_model, textures

DEFAULT = "exact (default)"


def scaling(rec: Recorder, extractor, root: Path, cache: Path, plan: dict) -> None:
    """Three sizes each of training images, bank ratio and image size (the 411-image run is one of them);
    plus the fit buffer variants (float16, spilled to disk) and their peak RSS."""
    scale_images(rec, extractor, root, plan)
    scale_ratio(rec, extractor, root, cache, plan)
    scale_image_size(rec, extractor, root, plan)


def scale_images(rec: Recorder, extractor, root: Path, plan: dict) -> None:
    """Seeded subsets of the same images, buffer in memory, no cache; the middle one with the other buffers."""
    for images in plan["scale_images"]:
        train, test = loaders(textures(root, plan["images"], train_limit=images), extractor)
        model = new_model(extractor, RATIO, None)
        report, m = fitted(model, train)
        fit_line(rec, "fit", model, report, m, RATIO, study="images", variant="float32 buffer in memory")
        predict_line(rec, model, test, DEFAULT, study="images", train_images=images)
        if images == plan["ratio_images"]:
            buffer_variants(rec, extractor, root, train, test, model.bank.features)


def buffer_variants(rec: Recorder, extractor, root: Path, train, test, in_memory: torch.Tensor) -> None:
    for variant, options in (("float16 buffer in memory", {"dtype": "float16"}),
                             ("float32 buffer spilled to disk", {"spill_dir": str(root / "spill")})):
        model = new_model(extractor, RATIO, None, **options)
        report, m = fitted(model, train)
        fit_line(rec, "fit", model, report, m, RATIO, study="buffer", variant=variant,
                 bank_equal_to_in_memory=bool(torch.equal(model.bank.features, in_memory)))
        predict_line(rec, model, test, DEFAULT, study="buffer", buffer=variant)


def scale_ratio(rec: Recorder, extractor, root: Path, cache: Path, plan: dict) -> None:
    middle = plan["ratio_images"]
    train, test = loaders(textures(root, plan["images"], train_limit=middle), extractor)
    for number, ratio in enumerate(plan["ratios"]):  # the first fills the cache, the others read it
        model = new_model(extractor, ratio, cache)
        report, m = fitted(model, train)
        fit_line(rec, "fit" if number == 0 else "fit_warm_cache", model, report, m, ratio, study="ratio")
        predict_line(rec, model, test, DEFAULT, study="ratio", ratio=ratio, train_images=middle)


def scale_image_size(rec: Recorder, extractor, root: Path, plan: dict) -> None:
    for size in plan["sizes"]:
        train, test = loaders(textures(root, plan["images"], image_size=size, train_limit=plan["size_images"]),
                              extractor)
        model = new_model(extractor, RATIO, None)
        report, m = fitted(model, train)
        fit_line(rec, "fit", model, report, m, RATIO, study="image_size", image_size=size)
        predict_line(rec, model, test, DEFAULT, study="image_size", image_size=size,
                     train_images=plan["size_images"])
