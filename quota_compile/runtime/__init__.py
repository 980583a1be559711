"""Running a bundle: onnxruntime sessions, batching and greedy generation."""
