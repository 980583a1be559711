"""Token pruning: QUOTA's score, the per-layer budget allocator and the recipe."""
