"""The onnxruntime flavour: MatMulNBits / MatMulIntegerToFloat / GatherBlockQuantized /
GroupQueryAttention graphs for onnxruntime's CPU provider."""
