"""Flavours: each target of ``export.targets`` as one object (config checks, lowering from
the portable graphs, verification, manifest entry), and a registry of them."""
