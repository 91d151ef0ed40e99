# Changed for nnx-ckpt-widgets' tests: upstream imports every model here; see ../README.md.
