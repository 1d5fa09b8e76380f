"""mdsd3: paired clean/degraded image datasets from a masked Stable Diffusion 3 transformer."""

__version__ = "0.1.0"
