"""Mask2Former-style segmentor for Split Matching: backbone, pixel decoders, masked transformer
decoder, MFE, and the `Segmentor` that ties them together (`build_segmentor` reads the config)."""
from splitmatch.model.backbone import ResNetBackbone
from splitmatch.model.mfe import MultiScaleFeatureEnhancement
from splitmatch.model.pixel_decoder import FPNPixelDecoder, MSDeformAttnPixelDecoder
from splitmatch.model.segmentor import Segmentor, build_segmentor, semantic_inference
from splitmatch.model.transformer_decoder import EmbeddingClassifier, MaskedTransformerDecoder

__all__ = [
    "ResNetBackbone", "FPNPixelDecoder", "MSDeformAttnPixelDecoder", "MaskedTransformerDecoder",
    "EmbeddingClassifier", "MultiScaleFeatureEnhancement", "Segmentor", "build_segmentor",
    "semantic_inference",
]
