"""The model library: diffusers-style parts for ControlNeXt-SVD (pose encoder, cross normalisation,
injection hooks, window planning, the pipeline, chunked decoding, checkpoint formats, tiny components).

It imports nothing of the application (`svd_animate`) or of `pose`; see DESIGN.md for the layers."""

import logging

# transformers 5 gave the name `CLIPImageProcessor` to a torchvision backend; without torchvision, the first use of
# that name (diffusers' SVD pipeline imports it) logs that it falls back to the PIL processor, which is the one SVD
# always used. Nothing to act on, and on every run: dropped here, every other transformers message kept.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())

# diffusers warns on every `.to(dtype)` of a model whose list of fp32-only modules is empty ("There are modules ...
# that should be kept in float32: []"), which the pipeline's fp16 VAE upcast does each call, and on every component
# moved to the CPU in float16 (11 lines for one `--dtype fp16 --device cpu` run; the Animator says it once itself).
_DIFFUSERS_NOISE = ("that should be kept in float32: []", "cannot run with `cpu` device")
for _name in ("diffusers.models.modeling_utils", "diffusers.pipelines.pipeline_utils"):
    logging.getLogger(_name).addFilter(
        lambda record: not any(noise in record.getMessage() for noise in _DIFFUSERS_NOISE))
