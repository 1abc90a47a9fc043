"""splitmatch: Split Matching for inductive zero-shot semantic segmentation."""
__version__ = "0.1.0"
