"""Data: ShapesVQA, calibration and verification samples, public benchmark loaders."""
