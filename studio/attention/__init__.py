"""Cross-attention: capture without leaving the fused SDPA path, word maps, self-attention on demand, control.

One concept per module:
    capture    processors that feed a session on the side (outputs untouched); `manager.capture(...)`
    tokens     prompt words <-> token positions (subword tokens, SOS/EOS)
    result     what a job leaves behind, on the CPU; a small server-side cache for the UI
    run        generate with maps (optionally guided); the same request with and without control
    any_image  maps for an uploaded image: VAE encode, add_noise to t, one UNet pass
    maps       layer/step/head selection, word maps, normalization, binarization, per-word summary
    selfattn   one pixel's self-attention row on demand; top components at <= 32x32
    control    Attend-and-Excite, A-STAR, prompt-to-prompt reweighting
    render     colormaps, overlays, labelled grids;  view: one view of a result;  export: PNG, .npz, JSON
    cli        `python -m studio attention`
"""
