"""The bundle on disk: its format, its manifest, its report and figures."""
