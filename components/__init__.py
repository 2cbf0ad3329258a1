"""Concept Studio's Gradio UI: one thin module per tab; all method logic lives in studio/."""
