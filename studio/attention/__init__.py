"""Cross-attention: capture on the fused SDPA path, word maps, self-attention on demand, control.

capture: hooks feeding a session; tokens: words <-> token positions; result: a job's output;
run / any_image: maps of a generation / an uploaded image; maps: selection, word maps, summary;
selfattn: pixel rows, components; control: Attend-and-Excite, A-STAR, reweighting;
render / view / export: drawing, one view, PNG + npz + JSON.
"""
