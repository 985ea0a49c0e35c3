"""`PoseEncoder`: the light control encoder of ControlNeXt-SVD-v2, plus optional temporal mixing.

Layers, names and shapes are the published `controlnet.bin`'s (52 tensors, 3,526,400 parameters)
when `temporal_layers` is off, so the released weights load strictly. Built from diffusers' blocks
(`Timesteps`, `TimestepEmbedding`, `ResnetBlock2D`, `Downsample2D`).

`embedding_padding`: the published inference code pads the two stride-1 embedding convs by 0, the
training code by 1 (same weights, output 127x71 vs 128x72 for a 1024x576 video). The default is 0,
the published inference code, because that is how the released weights produce the published videos.

Temporal awareness: after each stage a residual temporal convolution mixes each pixel's features
across the frames of a clip. Its last conv starts at zero, so published weights behave exactly as
published until fine-tuned.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

INJECTION_SITES = ("down_blocks.0", "mid_block")


class TemporalMixer(nn.Module):
    """Residual 1-D convolutions over the frame axis, per pixel; zero-initialised output."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv_in = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.act = nn.SiLU()
        self.conv_out = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, hidden: torch.Tensor, num_frames: int) -> torch.Tensor:
        bf, channels, height, width = hidden.shape
        batch = bf // num_frames
        sequence = hidden.reshape(batch, num_frames, channels, height, width).permute(0, 3, 4, 2, 1)
        sequence = sequence.reshape(batch * height * width, channels, num_frames)
        mixed = self.conv_out(self.act(self.conv_in(sequence)))
        mixed = mixed.reshape(batch, height, width, channels, num_frames).permute(0, 4, 3, 1, 2)
        return hidden + mixed.reshape(bf, channels, height, width)


class PoseEncoder(ModelMixin, ConfigMixin):
    """Pose frames (B, F, 3, H, W) in [0, 1] and the timestep -> control features (B*F, 320, h, w)."""

    @register_to_config
    def __init__(
        self,
        time_embed_dim: int = 256,
        in_channels: tuple[int, ...] = (128, 128),
        out_channels: tuple[int, ...] = (128, 256),
        groups: tuple[int, ...] = (4, 8),
        control_channels: int = 320,
        embedding_padding: int = 0,
        temporal_layers: bool = False,
        injection_site: str = "down_blocks.0",
        control_strength: float = 0.2,
    ):
        super().__init__()
        if injection_site not in INJECTION_SITES:
            raise ValueError(f"injection_site must be one of {INJECTION_SITES}, got {injection_site!r}")
        if embedding_padding not in (0, 1):
            raise ValueError(f"embedding_padding must be 0 (published inference) or 1 (training), got {embedding_padding}")
        self.time_proj = Timesteps(128, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(128, time_embed_dim)
        pad = embedding_padding
        self.embedding = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2, padding=1), nn.GroupNorm(2, 64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=pad), nn.GroupNorm(2, 64), nn.ReLU(),
            nn.Conv2d(64, in_channels[0], 3, padding=pad), nn.GroupNorm(2, in_channels[0]), nn.ReLU(),
        )
        self.down_res = nn.ModuleList(
            ResnetBlock2D(in_channels=c_in, out_channels=c_out, temb_channels=time_embed_dim, groups=g, eps=1e-6)
            for c_in, c_out, g in zip(in_channels, out_channels, groups)
        )
        self.down_sample = nn.ModuleList(
            Downsample2D(c_out, use_conv=True, out_channels=c_out, padding=1, name="op") for c_out in out_channels
        )
        last = out_channels[-1]
        self.mid_convs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(last, last, 3, padding=1), nn.ReLU(), nn.GroupNorm(8, last),
                          nn.Conv2d(last, last, 3, padding=1), nn.GroupNorm(8, last)),
            nn.Conv2d(last, control_channels, 1),
        ])
        self.temporal = nn.ModuleList(TemporalMixer(c) for c in out_channels) if temporal_layers else None

    def forward(self, pose_frames: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        batch, num_frames = pose_frames.shape[:2]
        # Channels-last: the convolutions are nearly all of the encoder's time, and run ~30 % faster so.
        sample = pose_frames.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        timestep = torch.as_tensor(timestep, device=sample.device)
        timestep = timestep.reshape(-1).expand(batch) if timestep.numel() in (1, batch) else timestep
        temb = self.time_embedding(self.time_proj(timestep).to(sample.dtype))
        temb = temb.repeat_interleave(num_frames, dim=0)

        hidden = self.embedding(sample)
        for index, (resnet, downsample) in enumerate(zip(self.down_res, self.down_sample)):
            hidden = downsample(resnet(hidden, temb))
            if self.temporal is not None:
                hidden = self.temporal[index](hidden, num_frames)
        hidden = hidden + self.mid_convs[0](hidden)
        return self.mid_convs[1](hidden)
