"""Customization: teach the model new concepts from a few images and compose several of them."""
from . import collage  # noqa: F401  (registers "learned_concept" and the compose_* edit kinds, through its imports)
