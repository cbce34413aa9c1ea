"""The engine: models, the sampler, masked loss math, the device layout and the top-k teacher-signal store."""
