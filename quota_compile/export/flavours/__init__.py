"""Flavours: translations of the portable graphs for one runtime (onnxruntime, TensorRT, PyTorch + Triton)."""
