"""Cross-attention: word maps, self-attention on demand, control, on the shared capture (studio/capture.py).

result: a job's output; run / any_image: maps of a generation / an uploaded image;
maps: the words shown, selection, word maps, summary; selfattn: pixel rows, components;
control: Attend-and-Excite, A-STAR, reweighting; render / view / export: drawing, one view, PNG + npz + JSON.
"""
