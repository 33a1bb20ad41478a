"""cxr-pipeline: pipelines."""
