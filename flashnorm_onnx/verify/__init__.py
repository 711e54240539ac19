"""Verification: generated inputs, the whole-model, subgraph, algebraic and plan-diff checks."""
