"""The model library: diffusers-style parts for ControlNeXt-SVD (pose encoder, cross normalisation,
injection hooks, window planning, the pipeline, chunked decoding, checkpoint formats, tiny components).

It imports nothing of the application (`svd_animate`) or of `pose`; see DESIGN.md for the layers."""

import logging

# transformers 5 gave the name `CLIPImageProcessor` to a torchvision backend; without torchvision, the first use of
# that name (diffusers' SVD pipeline imports it) logs that it falls back to the PIL processor, which is the one SVD
# always used. Nothing to act on, and on every run: dropped here, every other transformers message kept.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())
