"""From traced programs to ONNX: the export, user passes and the flavours."""
