__description__ = "Bonsai is a minimal, lightweight JAX implementation of popular models."
__version__ = "0.0.0"

__all__ = ["__description__", "__version__"]
