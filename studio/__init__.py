"""Concept Studio's engine: one pipeline manager with an exact edit stack. No UI code here."""
from .edits import Edit, EditStack, Patch, edit_kind
from .errors import EditError, JobStopped, StudioError
from .generation import GenerationRequest
from .manager import PipelineManager
from . import kinds  # noqa: F401  (registers every edit kind, above the manager)

__all__ = ["Edit", "EditStack", "Patch", "edit_kind", "EditError", "JobStopped", "StudioError",
           "GenerationRequest", "PipelineManager"]
