"""The TensorRT flavour: plugin nodes for the W4A4 Linears and the quantized KV cache, their
verification through onnxruntime-extensions, and engine builds where TensorRT is."""
