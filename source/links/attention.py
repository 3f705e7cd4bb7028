"""Self-attention of SAGAN/BigGAN (Zhang et al., 2019), as in StudioGAN's big_resnet.

Queries at every position attend over keys and values max-pooled 2x2 (a quarter of the positions); the result
is projected back to the input width and added with a learned scale ``gamma`` that starts at 0, so the layer
starts as the identity. Query/key widths are C/8, the value width C/2; every 1x1 conv is bias-free.
"""
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttention(nn.Module):
    def __init__(self, channels: int, make_conv: Callable[[int, int], nn.Module]):
        super().__init__()
        if channels % 8:
            raise ValueError(f"SelfAttention: channels must be a multiple of 8, got {channels}")
        self.query = make_conv(channels, channels // 8)
        self.key = make_conv(channels, channels // 8)
        self.value = make_conv(channels, channels // 2)
        self.out = make_conv(channels // 2, channels)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, height, width = x.shape
        query = self.query(x).flatten(2)                        # (N, C/8, HW)
        key = F.max_pool2d(self.key(x), 2).flatten(2)           # (N, C/8, HW/4)
        value = F.max_pool2d(self.value(x), 2).flatten(2)       # (N, C/2, HW/4)
        attention = torch.softmax(query.transpose(1, 2) @ key, dim=-1)  # (N, HW, HW/4): each position's weights
        attended = (value @ attention.transpose(1, 2)).view(n, -1, height, width)
        return x + self.gamma * self.out(attended)
