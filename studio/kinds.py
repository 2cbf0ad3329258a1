"""Every edit kind, registered. The core (manager, edits) imports no method package, so the
`@edit_kind` registrations run here, above it: `import studio` imports this module, and so every
entry does (the CLI, the app, a Python user's `import studio.manager`), and every kind is known
before a saved history or an edit file is restored. A module that defines an edit kind is listed here."""
from . import layer_scale  # noqa: F401  "scale"
from .customize import collage, compose, concept  # noqa: F401  "learned_concept", "compose_*"
from .erase import closed_form, esd, guard  # noqa: F401  "erase_closed_form", "esd_lora", "erase_guard"
from .toyworld import presets  # noqa: F401  the "toy" template preset that saved toy erasures name
