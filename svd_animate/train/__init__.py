"""Fine-tuning the pose encoder (and optionally the UNet) on pose datasets: `svd-animate train`."""
