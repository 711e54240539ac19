"""int4 quantization (MatMulNBits) of the folded or unfolded model."""
