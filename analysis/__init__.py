"""Beside the package, above its entry points: studies of the package and its runs (`-m analysis.<name>`)."""
