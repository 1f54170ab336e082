"""Flow matching: linear path, time sampling and shift, loss, samplers and guidance (SPEC section 4)."""
