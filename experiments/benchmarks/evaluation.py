"""The metrics of one category's predictions: ``core.metrics.pixel_metrics`` (one ranking of the pixels, what
runs use) against the one-metric reference functions (one sort each), timed interleaved on the same maps."""

from __future__ import annotations

from core.detector import Predictions
from core.metrics import PIXEL_METRICS, aupro, aupro_defect_images, pixel_auroc, pixel_f1_max, pixel_metrics
from experiments.benchmarks.recording import Recorder, measured, median_run, seconds_runs

ONE_RANKING = "pixel metrics from one ranking of the pixels (core.metrics.pixel_metrics, what runs use)"
ONE_SORT_EACH = "pixel metrics one sort each (pixel_auroc, pixel_f1_max, aupro, aupro_defect_images)"
REFERENCES = {"pixel_auroc": pixel_auroc, "pixel_f1_max": pixel_f1_max, "aupro": aupro,
              "aupro_defect_images": aupro_defect_images}
REPEATS = 3


def bench_metrics(rec: Recorder, predictions: Predictions, **tag) -> None:
    """Two ``evaluate`` lines (medians of ``REPEATS`` interleaved runs); the values must agree to 1e-12."""
    masks, maps = predictions.masks, predictions.maps
    if not masks.any():
        return
    runs: dict[str, list[dict]] = {ONE_RANKING: [], ONE_SORT_EACH: []}
    for _ in range(REPEATS):
        with measured() as m:
            found = pixel_metrics(masks, maps)
        runs[ONE_RANKING].append(m)
        with measured() as m:
            expected = {key: REFERENCES[key](masks, maps) for key in PIXEL_METRICS}
        runs[ONE_SORT_EACH].append(m)
    differences = [abs(found[key] - expected[key]) for key in PIXEL_METRICS if expected[key] is not None]
    if max(differences, default=0.0) > 1e-12:
        raise AssertionError(f"pixel_metrics {found} differs from the one-metric functions {expected}")
    for variant, measurements in runs.items():
        m = median_run(measurements)
        rec.emit("evaluate", len(maps), None, None, m["seconds"], len(maps), m["peak_rss_mb"], variant=variant,
                 pixels=int(maps.size), seconds_runs=seconds_runs(measurements), **tag)
