from pixart.pipelines.pixart_pipeline import PipelineOutput, PixArtAlphaPipeline, PixArtSigmaPipeline

__all__ = ["PipelineOutput", "PixArtAlphaPipeline", "PixArtSigmaPipeline"]
