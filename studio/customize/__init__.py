"""Customization: teach the model new concepts from a few images and compose several of them."""
from . import concept  # noqa: F401  (registers the "learned_concept" edit kind)
from . import compose  # noqa: F401  (registers the compose_* edit kinds)
from . import collage  # noqa: F401  (registers "compose_regions")
