"""One timed run of one model on one shape, with inputs and outputs bound once (IO binding)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from flashnorm_onnx.profile.sessions import Settings, session_options


class Runner:
    """One model, one shape: feeds bound once, outputs bound to preallocated buffers."""

    def __init__(self, session, feeds: dict[str, np.ndarray], settings: Settings, path: str | Path | None = None):
        import onnxruntime as ort

        self.session = session
        self.settings = settings
        device = "cuda" if settings.provider == "cuda" else "cpu"
        self.device = device
        self.binding = session.io_binding()
        self._inputs = {}
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, settings.device_id)
            self._inputs[name] = value  # keep alive
            self.binding.bind_ortvalue_input(name, value)
        # learn the output shapes, then bind buffers allocated once (CUDA graphs need fixed addresses)
        if settings.cuda_graph and path is not None:
            # a CUDA-graph session captures on its first runs: learn the shapes on a CPU session
            cpu = ort.InferenceSession(str(path), session_options(dataclasses.replace(settings, cuda_graph=False)),
                                       providers=["CPUExecutionProvider"])
            shapes = [(np.asarray(v).shape, np.asarray(v).dtype) for v in cpu.run(None, feeds)]
            del cpu
        else:
            for out in session.get_outputs():
                self.binding.bind_output(out.name, device, settings.device_id)
            session.run_with_iobinding(self.binding)
            shapes = [(tuple(v.shape()), _np_dtype(v.data_type())) for v in self.binding.get_outputs()]
            self.binding.clear_binding_outputs()
        self._outputs = []
        for out, (shape, dtype) in zip(session.get_outputs(), shapes):
            buffer = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, device, settings.device_id)
            self._outputs.append(buffer)
            self.binding.bind_ortvalue_output(out.name, buffer)
        self.run_options = ort.RunOptions()

    def run(self) -> float:
        start = time.perf_counter()
        self.session.run_with_iobinding(self.binding, self.run_options)
        if self.device != "cpu":
            self.binding.synchronize_outputs()
        return time.perf_counter() - start


_ORT_NP = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
}


def _np_dtype(ort_type: str):
    return _ORT_NP.get(ort_type, np.float32)
