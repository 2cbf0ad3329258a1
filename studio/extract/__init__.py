"""Extraction: pull several concepts out of one image. Masks from the model's own attention (localize),
or from clicks through Segment Anything (sam); then one token per mask (break_a_scene)."""
