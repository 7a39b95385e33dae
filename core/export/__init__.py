"""Export of a fitted PatchCore: one graph from images to scores, maps and decisions (ONNX, OpenVINO,
TorchScript; ``graph``), the folder that holds it (``writer``) and a small runtime for it (``runtime``)."""

from core.export.graph import DEFAULT_CHUNK, ChunkedNearest, ExportablePatchCore, UnsupportedExportError
from core.export.runtime import ExportedModel, ExportedModelError
from core.export.writer import FORMATS, ExportError, export_model, onnx_to_openvino

__all__ = ["DEFAULT_CHUNK", "FORMATS", "ChunkedNearest", "ExportError", "ExportablePatchCore", "ExportedModel",
           "ExportedModelError", "UnsupportedExportError", "export_model",
           "onnx_to_openvino"]
