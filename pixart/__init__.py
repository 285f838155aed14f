"""MindSpore PixArt-Σ / PixArt-α: diffusion transformers for text-to-image generation."""

__version__ = "0.1.0"
