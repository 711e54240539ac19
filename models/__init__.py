"""Recipes that build the tiny test models (random weights, from transformers configs).

See :mod:`models.fixtures` (``python -m models.fixtures list``).
"""
