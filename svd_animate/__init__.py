"""The application: option definitions and presets, framing, the animate, batch and train jobs, and the
`svd-animate` command (`svd_animate.cli`). Built on `pose`, `svd_controlnext` and `svd_common`; see DESIGN.md."""
