"""The model library: diffusers-style parts for ControlNeXt-SVD (pose encoder, cross normalisation,
injection hooks, window planning, the pipeline, chunked decoding, checkpoint formats, tiny components).

It imports nothing of the application (`svd_animate`) or of `pose`; see DESIGN.md for the layers."""
