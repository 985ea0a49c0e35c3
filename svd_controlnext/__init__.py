"""The model side of svd-animate (pose encoder, cross-normalised injection into the SVD UNet,
pipeline, windows, chunked decoding, weights). See DESIGN.md; built by the model issue."""
