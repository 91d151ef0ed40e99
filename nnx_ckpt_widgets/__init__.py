"""nnx-ckpt-widgets."""
