"""The engine: models, the sampler, masked loss math and the device layout."""
