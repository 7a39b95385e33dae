"""A real-image workload (``--real``): ELPV solar cells or any MVTec-layout folder, the default model's prediction
against the official-style pipeline on the same images and weights, so the prediction ratio is known for real
images as well as for the textures workload (issue 29: the ratio was 4.3x on textures, 1.6-1.7x on ELPV).

``--real elpv:mono`` / ``elpv:poly`` (the installed ELPV cells) or ``--real <folder>:<category>`` (MVTec AD
layout: ``<folder>/<category>/train/good``, ``test/<defect type>``), each optionally ending in ``@<ratio>``, the
bank's coreset ratio (``elpv:poly@0.01``: the 1 % bank the issue measured poly with). Without it: ``--real-ratio``,
else the default settings' 10 % (conf/coreset/greedy.yaml), the setting the issue's goal is about.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader

from core.backbones import EfficientNetLite
from core.data import ElpvLayout, MVTecLayout
from core.search import ReferenceSearch
from experiments.benchmarks.prediction import OFFICIAL_STYLE, predict_line, starting_point_pipeline
from experiments.benchmarks.recording import Recorder
from experiments.benchmarks.searches import DEFAULT
from experiments.benchmarks.workload import Workload, bank_with, new_model

DEFAULT_RATIO = 0.1  # conf/coreset/greedy.yaml's ratio


class RealWorkloadError(ValueError):
    """A ``--real`` value that names no dataset this bench can open."""


def bank_ratio(spec: str) -> tuple[str, float | None]:
    """``spec`` without its ``@<ratio>`` ending, and that ratio (None without one)."""
    name, at, ratio = spec.rpartition("@")
    if not at:
        return spec, None
    try:
        value = float(ratio)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise RealWorkloadError(f"--real {spec!r}: the part after '@' is the bank's coreset ratio, a number in "
                                f"(0, 1] such as {name}@0.01")
    return name, value


def real_dataset(spec: str, train_limit: int | None) -> tuple[MVTecLayout, str]:
    """The dataset and category ``spec`` names (module docstring)."""
    spec = bank_ratio(spec)[0]
    if spec.startswith("elpv:"):
        category = spec.split(":", 1)[1]
        return ElpvLayout(categories=[category], train_limit=train_limit), category
    root, _, category = spec.rpartition(":")
    if not root or not category or not (Path(root) / category / "train").is_dir():
        raise RealWorkloadError(f"--real {spec!r}: give elpv:mono, elpv:poly or <folder>:<category> with "
                                f"<folder>/<category>/train/good (MVTec AD layout)")
    return MVTecLayout("folder", root, [category], "good", 256, 224, train_limit), category


def fitted_default(spec: str, train_limit: int | None, ratio: float, device="cpu") -> tuple:
    """The default model (official embedding, squared distances, greedy coreset) fitted on the workload's training
    images: the model, its extractor, the number of training images and the test set."""
    dataset, category = real_dataset(spec, train_limit)
    extractor = EfficientNetLite().eval().to(device)
    preprocessing = dataset.preprocessing(extractor.mean, extractor.std, extractor.interpolation)
    train = dataset.train_set(category, preprocessing)
    model = new_model(extractor, ratio, None, "official", device)
    model.fit(DataLoader(train, batch_size=8, num_workers=0))
    return model, extractor, len(train), dataset.test_set(category, preprocessing)


def bench_real(rec: Recorder, work: Workload, spec: str, ratio: float | None = None,
               train_limit: int | None = None) -> None:
    """Fit the default model on the real training images, then predict the test images the official-style way
    (eager backbone, every distance in all dimensions, one batch at a time) and the default way; the default's
    scores are checked against the official-style ones."""
    ratio = bank_ratio(spec)[1] or (DEFAULT_RATIO if ratio is None else ratio)
    model, extractor, train_images, test_set = fitted_default(spec, train_limit, ratio, work.device)
    test = DataLoader(test_set, batch_size=8, num_workers=0)
    features = model.bank.features.clone()
    tag = {"study": f"real:{spec}", "aggregation": "official", "train_images": train_images}
    with starting_point_pipeline(model, extractor):
        model.bank = bank_with(features, ReferenceSearch())
        reference = predict_line(rec, model, test, OFFICIAL_STYLE, ratio=ratio, workers=1, **tag)
    model.bank = bank_with(features)
    model.predict(test)  # warm-up: compiled kernels, the embedder's projection
    predict_line(rec, model, test, DEFAULT, reference, ratio=ratio, repeats=3 if work.on_cpu else 1,
                 strategy=model.bank.strategy.name, **tag)
