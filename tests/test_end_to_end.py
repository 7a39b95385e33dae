"""End to end on the embedded textures set with real ImageNet features (EfficientNet-Lite0).

Bars are set from measured values (`make demo` = ``experiment=demo``: 40 training and 48 test images per
category, default settings, official embedding, coreset 10%, seed 0; textures-generator 2): mean image AUROC
0.896 (brick 0.913, grass 0.830, gravel 0.936, tissue 0.905), mean pixel AUROC 0.971, mean AUPRO 0.918; the map
maximum fell inside the mask for every obvious hole and colour defect of brick and tissue.
``patchcore.embedder.aggregation=channel_mean`` (the suite's earlier embedding) must reproduce its demo
numbers exactly: 0.90495 / 0.87929 / 0.97145 / 0.51262 / 0.89438 (image AUROC, image F1-max, pixel AUROC,
pixel F1-max, AUPRO).
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from core.data import AnomalyDataset, Preprocessing, TexturesLayout
from core.data.textures import SEVERITY_SIDECAR
from core.patchcore import PatchCore
from experiments.harness.fit_and_evaluate import run
from tests.conftest import CONF_DIR


def textures_results(tmp_path_factory, textures_root, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["num_workers=0", "progress=false", "experiment=demo",
                                           f"dataset.root={textures_root}", "logger=none", *overrides])
    run_dir = tmp_path_factory.mktemp("textures_run")
    run(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def textures_run(tmp_path_factory, textures_root):
    return textures_results(tmp_path_factory, textures_root, "save_model=true")


def test_channel_mean_reproduces_the_earlier_demo_exactly(tmp_path_factory, textures_root) -> None:
    run_dir = textures_results(tmp_path_factory, textures_root, "patchcore.embedder.aggregation=channel_mean",
                               "viz.n=0")
    mean = json.loads((run_dir / "results.json").read_text())["mean"]
    expected = {"image_auroc": 0.90495, "image_f1_max": 0.87929, "pixel_auroc": 0.97145, "pixel_f1_max": 0.51262,
                "aupro": 0.89438}
    for metric, value in expected.items():
        assert mean[metric] == pytest.approx(value, abs=1e-5), metric


def test_detection_and_segmentation_quality(textures_run) -> None:
    results = json.loads((textures_run / "results.json").read_text())
    assert results["complete"] and set(results["categories"]) == {"brick", "grass", "gravel", "tissue"}
    assert results["config"]["patchcore"]["embedder"]["aggregation"] == "official"
    assert results["mean"]["image_auroc"] >= 0.87
    assert results["mean"]["pixel_auroc"] >= 0.96
    assert results["mean"]["aupro"] >= 0.89
    for name, entry in results["categories"].items():
        assert entry["image_auroc"] >= 0.80, name
        assert entry["n_train"] == 40 and entry["n_test"] == 48


@pytest.mark.parametrize("category", ["brick", "tissue"])
def test_planted_defects_peak_inside_their_masks(textures_run, textures_root, category) -> None:
    # the obvious holes and colour defects (severity >= 2/3 in the sidecar), all of them, not only the demo's
    model = PatchCore.load(textures_run / "models" / category, progress=False)
    preprocessing = Preprocessing(**model.metadata["preprocessing"])
    with open(textures_root / category / "test" / SEVERITY_SIDECAR, newline="") as f:
        obvious = {r["file"] for r in csv.DictReader(f) if r["level"] == "obvious"}
    samples = [s for s in TexturesLayout(root=textures_root).test_samples(category)
               if s.defect_type in ("hole", "color") and str(s.path.relative_to(textures_root / category)) in obvious]
    assert len(samples) >= 16
    predictions = model.predict(DataLoader(AnomalyDataset(samples, preprocessing), batch_size=8))
    for defect, mask, anomaly_map in zip(predictions.defect_types, predictions.masks, predictions.maps):
        y, x = np.unravel_index(anomaly_map.argmax(), anomaly_map.shape)
        assert mask[y, x], f"{category}/{defect}: map maximum at {(y, x)} outside the mask"
