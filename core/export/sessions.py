"""Opening an exported graph in ONNX Runtime or OpenVINO, for runs on several Python threads at once.

The thread rule is the PyTorch path's (``core.threads``): the budget is ``torch.get_num_threads()``;
``ExportedModel.run`` splits a batch into that many pieces (``core.threads.in_pieces``) and each piece runs
on its own Python thread with one intra-op thread, so runtime threads never multiply with Python ones.
ONNX Runtime's ``InferenceSession.run`` may be called from several threads at once; OpenVINO gets one
stream per thread (``NUM_STREAMS``) and one infer request per thread.

ONNX Runtime runs with ``session.disable_prepacking=1``: by default it keeps a prepacked copy of every
matrix-product constant, i.e. the whole bank of the single graph a second time, at the same speed within
noise (docs/deployment.md, Export). OpenVINO is compiled with ``INFERENCE_PRECISION_HINT=f32`` unless asked
otherwise: on CPUs with bfloat16 units its default would compute in bfloat16 (~0.1-1% score change).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

Runner = Callable[[np.ndarray], list[np.ndarray]]


def onnx_runner(path: Path) -> Runner:
    """``run(batch) -> outputs`` of the ONNX graph at ``path``, on one intra-op thread per call."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.intra_op_num_threads = 1  # the Python threads of core.threads.in_pieces are the parallelism
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})


def openvino_runner(path: Path, precision: str, threads: int) -> Runner:
    """``run(batch) -> outputs`` of the OpenVINO IR at ``path``: ``threads`` streams of one thread each, an
    infer request per calling thread."""
    import openvino

    config = {"INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": max(1, threads),
              "INFERENCE_NUM_THREADS": max(1, threads)}
    compiled = openvino.Core().compile_model(str(path), "CPU", config)
    local = threading.local()

    def run(batch: np.ndarray) -> list[np.ndarray]:
        if not hasattr(local, "request"):
            local.request = compiled.create_infer_request()
        result = local.request.infer({0: batch})
        return [np.array(result[output]) for output in compiled.outputs]

    return run


def open_runner(path: Path, format: str, precision: str, threads: int) -> Runner:
    """The runner of ``format`` (``onnx`` | ``openvino``) for the graph file ``path``."""
    return onnx_runner(path) if format == "onnx" else openvino_runner(path, precision, threads)
