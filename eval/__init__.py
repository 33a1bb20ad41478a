"""cxr-pipeline: eval."""
