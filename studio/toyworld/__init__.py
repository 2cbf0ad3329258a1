"""The toy world: procedural scenes with exact ground truth, for a model whose knowledge can be checked."""
