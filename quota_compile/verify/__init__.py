"""The verification gate: every graph against the PyTorch simulation."""
