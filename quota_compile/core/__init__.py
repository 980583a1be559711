"""The shared core below the commands: the decisions a compile takes (the pruning recipe, given
or calibrated) and the build of one deployment variant, which compile, eval and bench all use."""
