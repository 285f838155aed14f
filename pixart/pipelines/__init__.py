"""Text-to-image pipelines (MindSpore is imported when a pipeline class is first used)."""
__all__ = ["PipelineOutput", "PixArtAlphaPipeline", "PixArtSigmaPipeline", "PipelineConfig"]


def __getattr__(name):
    if name in ("PipelineOutput", "PixArtAlphaPipeline", "PixArtSigmaPipeline"):
        from pixart.pipelines import pixart_pipeline

        return getattr(pixart_pipeline, name)
    if name == "PipelineConfig":
        from pixart.pipelines.config import PipelineConfig

        return PipelineConfig
    raise AttributeError(f"module 'pixart.pipelines' has no attribute {name!r}")
