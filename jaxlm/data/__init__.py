"""Input pipeline: sources (documents), tokenizers, and the Grain pipeline."""
