"""Extraction: pull several concepts out of one image.

localize: masks found from the model's own self-attention (no input), image preparation and mask
checks; sam: masks from clicks or automatically through Segment Anything (needs a checkpoint);
break_a_scene: one token per mask.
"""
