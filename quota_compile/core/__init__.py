"""The shared core below the commands: the pruning decision (given, calibrated or by rule), the
deployment variants of eval and bench, and the workbench whose one build (decide → trace →
export → passes → flavours) compile, eval and bench all use."""
