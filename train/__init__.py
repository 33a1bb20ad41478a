"""cxr-pipeline: train."""
