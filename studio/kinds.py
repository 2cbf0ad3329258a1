"""Registers every edit kind (list here each module that defines one): the core imports no method package, and
`import studio` imports this, so every kind is known before a saved history or an edit file is restored."""
from . import layer_scale  # noqa: F401  "scale"
from .customize import collage, compose, concept  # noqa: F401  "learned_concept", "compose_*"
from .erase import closed_form, esd, guard  # noqa: F401  "erase_closed_form", "esd_lora", "erase_guard"
from .toyworld import presets  # noqa: F401  the "toy" template preset that saved toy erasures name
