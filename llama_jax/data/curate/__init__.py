"""Per-source cleaning recipes (datatrove pipelines), their steps and their trained models."""
