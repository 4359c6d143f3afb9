"""Layer 2, tasks: a sweep's summary, its tables, charts, curves and W&B run (`python -m aclip.summary`)."""
