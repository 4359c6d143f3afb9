"""Callbacks that observe or steer training."""
