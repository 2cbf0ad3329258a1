"""Erasure: closed-form, hardened, neighbour-aware, inference-time and fine-tuned ways to make a model forget."""
