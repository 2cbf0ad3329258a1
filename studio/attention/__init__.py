"""Cross-attention: capture without leaving the fused SDPA path, aggregation into word maps."""
