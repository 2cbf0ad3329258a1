"""Errors a user can cause. The UI shows their message as-is, so they must say what to do."""


class StudioError(ValueError):
    """Bad input or a refused request; the model and the edit history are unchanged."""


class EditError(StudioError):
    """An edit failed; everything it touched was restored before this was raised."""


class OverBudget(StudioError):
    """Saved edits whose undo backups would not fit in memory: refused, the stack as it was."""


class JobStopped(RuntimeError):
    """A long job stopped because the user asked; the model is left in a clean state."""
