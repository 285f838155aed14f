"""MindSpore PixArt-Σ / PixArt-α: diffusion transformers for text-to-image generation."""

__version__ = "0.1.0"


def __getattr__(name):
    # Pipelines import MindSpore and every model; load them only when asked for.
    if name in ("PixArtSigmaPipeline", "PixArtAlphaPipeline", "PipelineOutput"):
        from pixart import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'pixart' has no attribute {name!r}")
