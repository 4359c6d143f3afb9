"""Layer 3, training glue: the callbacks that observe or steer training."""
