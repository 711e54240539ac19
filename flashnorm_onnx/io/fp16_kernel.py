"""The float16 fold kernel run by ONNX Runtime (F16C casts, several GB/s), for the streamed writer.

The fold (``passes.fold_math``) needs only numpy; where ONNX Runtime is installed this module
gives it a faster kernel for float16 weights, used only after ``fold_math.kernel_agrees`` found it
bit-identical to the numpy path on this machine.
"""

from __future__ import annotations

import numpy as np

from flashnorm_onnx.passes import fold_math


def build_ort_kernel():
    """ONNX Runtime's Cast -> Mul -> Cast as a float16 fold kernel, or None without ONNX Runtime."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except Exception:  # noqa: BLE001 - no ONNX Runtime: numpy
        return None
    try:
        graph = helper.make_graph(
            [helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["wf", "g"], ["p"]),
             helper.make_node("Cast", ["p"], ["y"], to=TensorProto.FLOAT16)],
            "flashnorm_fold_kernel",
            [helper.make_tensor_value_info("w", TensorProto.FLOAT16, ["r", "n"]),
             helper.make_tensor_value_info("g", TensorProto.FLOAT, ["a", "b"])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["r", "n"])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 4
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

        def kernel(block: np.ndarray, g: np.ndarray, k_axis: int) -> np.ndarray:
            gg = g.reshape(1, 1) if g.size == 1 else (g.reshape(-1, 1) if k_axis == 0 else g.reshape(1, -1))
            return session.run(None, {"w": block, "g": gg})[0]

        return kernel
    except Exception:  # noqa: BLE001 - any trouble: numpy
        return None


fold_math.KERNEL_FACTORY = build_ort_kernel
