"""The tolerances of every check, in one table: the whole-model and subgraph comparisons
(relative to each output's magnitude, and absolute), and the algebraic check's for a folded tensor."""

#: (rtol, atol) by output dtype; relative to the output's largest magnitude.
TOLERANCES = {
    "float64": (1e-6, 1e-8),
    "float32": (1e-4, 1e-5),
    "float16": (2e-2, 2e-3),
    "bfloat16": (5e-2, 1e-2),
}

#: max |X@B* - (X*g)@B| relative to max |(X*g)@B|, by weight dtype
FOLD_TOLERANCES = {"float64": 1e-12, "float32": 1e-6, "float16": 2e-3, "bfloat16": 1.6e-2}
