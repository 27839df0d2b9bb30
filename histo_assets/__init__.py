"""histo-assets: synthetic H&E tissue images from per-class Stable Diffusion hypernetworks."""

__version__ = "0.1.0"
