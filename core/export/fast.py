"""The fast form of an export: the feature graph (normalisation, backbone, embedding; ``ExportableFeatures``)
run by ONNX Runtime or OpenVINO, then the suite's own exact search (``core.search.MemoryBank``, with the
search settings the model was fitted with) and the model's scoring head (``core.scoring.ScoringHead``):
the same code as ``PatchCore.score`` after ``embed``, so it scores at the PyTorch path's speed (the pruned
search) and cannot drift from it, where the single graph must compute every patch-to-bank distance.

The bank is read as a saved model's (``core.model_files.read_bank``: safetensors, finite, non-empty) after
the manifest gate has hashed it, and must have the shape ``export.json`` records; the scoring settings are
``export.json``'s ``model.scoring`` rebuilt through ``ScoringHead``, which checks them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.export.record import ExportedModelError
from core.export.sessions import Runner
from core.model_files import ModelFilesError, read_bank
from core.saved_model import BANK_FILE
from core.scoring import ScoringHead
from core.search import MemoryBank, SearchOptions


class FastForm:
    """``run(crops) -> [image_scores, anomaly_maps, (image_decisions, anomaly_masks)]`` (the single graph's
    outputs, in its order) from the feature graph's ``features(crops)`` and the bank in ``folder``."""

    def __init__(self, folder: Path, record: dict, features: Runner) -> None:
        self.features = features
        try:
            self.scoring = ScoringHead(**record["model"]["scoring"])
            search = SearchOptions.from_record(record["fast"]["search"], str(folder))
        except (TypeError, ValueError, KeyError) as error:
            raise ExportedModelError(f"{folder / 'export.json'} is not valid: its scoring or search settings are "
                                     f"refused ({error}); export the model again with this code") from None
        try:
            rows = read_bank(folder / BANK_FILE)
        except ModelFilesError as error:
            raise ModelFilesError(f"exported model {folder} is not valid: {error}; export the model again") from None
        expected = (record["bank_size"], record["embed_dim"])
        if tuple(rows.shape) != expected:
            raise ModelFilesError(f"exported model {folder} is not valid: {BANK_FILE} holds {tuple(rows.shape)} "
                                  f"features, export.json says bank_size x embed_dim = {expected}; export it again")
        self.bank = MemoryBank(search, metric=self.scoring.metric).build(rows)
        self.grid = tuple(record["grid"])
        self.size = tuple(record["input"]["shape"][2:])
        threshold = record.get("threshold") or {}
        self.thresholds = (threshold.get("image_threshold"), threshold.get("pixel_threshold"))

    def patch_features(self, crops: np.ndarray) -> torch.Tensor:
        """``[N, h*w, D]``: the feature graph's output for ``crops``."""
        return torch.from_numpy(np.ascontiguousarray(self.features(crops)[0]))

    def patch_scores(self, crops: np.ndarray) -> torch.Tensor:
        """``[N, h*w]``: each patch's score, as ``ScoringHead.score`` computes it before the image score."""
        features = self.patch_features(crops)
        distances, _ = self.bank.search(features.reshape(-1, features.shape[-1]), self.scoring.num_neighbors)
        return self.scoring.patch_scores(distances).reshape(features.shape[:2])

    def run(self, crops: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            scores, maps = self.scoring.score(self.patch_features(crops), self.bank, self.grid, self.size)
            outputs = [scores, maps]
            image, pixel = self.thresholds
            if image is not None:  # decided as the graph decides (ScoringHead.anomalous)
                outputs.append(self.scoring.anomalous(scores, image))
                if pixel is not None:
                    outputs.append(self.scoring.anomalous(maps, pixel))
        return [output.numpy() for output in outputs]
