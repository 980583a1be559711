"""The commands (compile, eval, bench), side by side above the shared core."""
