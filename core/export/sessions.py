"""Opening an exported graph in ONNX Runtime or OpenVINO, for runs on several Python threads at once.

The thread rule is the PyTorch path's (``core.threads``): the budget is ``torch.get_num_threads()``;
``ExportedModel.run`` splits a batch into that many pieces (``core.threads.in_pieces``) and each piece runs
on its own Python thread with one intra-op thread, so runtime threads never multiply with Python ones.
ONNX Runtime's ``InferenceSession.run`` may be called from several threads at once; OpenVINO gets one
stream per thread (``NUM_STREAMS``) and as many infer requests, owned by the runner.

ONNX Runtime runs with ``session.disable_prepacking=1``: by default it keeps a prepacked copy of every
matrix-product constant, i.e. the whole bank of the single graph a second time, at the same speed within
noise (docs/deployment.md, Export). OpenVINO is compiled with ``INFERENCE_PRECISION_HINT=f32`` unless asked
otherwise: on CPUs with bfloat16 units its default would compute in bfloat16 (~0.1-1% score change).
"""

from __future__ import annotations

import functools
import queue
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


@functools.cache
def openvino_core():
    """One OpenVINO ``Core`` for the process, as OpenVINO advises: a process that made one per model (the graph
    and the fast form of one export) and dropped them crashed later, when a child process exited."""
    import openvino

    return openvino.Core()


def openvino_runner(path: Path, precision: str, threads: int) -> Runner:
    """``run(batch) -> outputs`` of the OpenVINO IR at ``path``: ``threads`` streams of one thread each and as
    many infer requests, made once and lent to the calling threads: they live as long as the runner, whatever
    the lifetime of the short-lived worker threads of ``in_pieces``."""
    config = {"INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": max(1, threads),
              "INFERENCE_NUM_THREADS": max(1, threads)}
    compiled = openvino_core().compile_model(str(path), "CPU", config)
    requests: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(max(1, threads)):
        requests.put(compiled.create_infer_request())

    def run(batch: np.ndarray) -> list[np.ndarray]:
        request = requests.get()  # blocks while every request is in use (more calling threads than requests)
        try:
            result = request.infer({0: batch})
            return [np.array(result[output]) for output in compiled.outputs]
        finally:
            requests.put(request)

    return run


def open_runner(path: Path, format: str, precision: str, threads: int) -> Runner:
    """The runner of ``format`` (``onnx`` | ``openvino``) for the graph file ``path``."""
    return onnx_runner(path) if format == "onnx" else openvino_runner(path, precision, threads)
