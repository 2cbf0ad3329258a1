"""Cross-attention on the shared capture (studio/capture.py): maps of a generation (run) or an image (any_image),
word maps (maps), self-attention (selfattn), control, and drawing (render, view, export)."""
