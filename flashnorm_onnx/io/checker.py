"""onnx.checker, aware of the ONNX Runtime op that lives in the default domain.

ORT registers ``SimplifiedLayerNormalization`` in the ai.onnx domain (a quirk: ORT's own
transformers optimizer writes it there too), which onnx.checker does not know. We register its
schema, as ORT documents it, before checking; ops of other domains (com.microsoft) are not
checked against schemas by onnx.checker anyway.
"""

from __future__ import annotations

import os

import onnx
import onnx.defs as defs
from onnx import helper

_registered = False


def _register_ort_schemas() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    try:
        defs.get_schema("SimplifiedLayerNormalization", 1, "")
        return
    except defs.SchemaError:
        pass
    floats = ["tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"]
    param = defs.OpSchema.FormalParameter
    optional = defs.OpSchema.FormalParameterOption.Optional
    schema = defs.OpSchema(
        "SimplifiedLayerNormalization",
        "",
        1,
        doc="ONNX Runtime contrib op: RMSNorm, y = x / sqrt(mean(x^2) + epsilon) * scale.",
        inputs=[param("X", "T"), param("scale", "V")],
        outputs=[param("Y", "V"), param("inv_std_var", "U", param_option=optional)],
        type_constraints=[("T", floats, ""), ("U", ["tensor(float)", "tensor(double)"], ""), ("V", floats, "")],
        attributes=[
            defs.OpSchema.Attribute("axis", helper.make_attribute("axis", -1), ""),
            defs.OpSchema.Attribute("epsilon", helper.make_attribute("epsilon", 1e-5), ""),
            defs.OpSchema.Attribute("stash_type", helper.make_attribute("stash_type", 1), ""),
        ],
    )
    defs.register_schema(schema)


def check_model(path: str | os.PathLike) -> str | None:
    """None if the model passes onnx.checker, else the checker's message (first line)."""
    _register_ort_schemas()
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # onnx.checker.ValidationError and protobuf errors
        text = str(e).strip().splitlines()
        return text[0] if text else type(e).__name__
    return None
