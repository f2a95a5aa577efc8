"""A DCGAN28 with a small fully connected network on its code (issue 14, docs/NAIGN.md "A sixth session").

The fourth and fifth sessions found that f(z) = decode(encode(z)) draws from about eight directions of the
64-number code: the encoder's last layer is linear, so whatever it does to the codes of noise it does to the
codes of digits too. The codes of noise and of digits lie apart (their means 33 to 70 apart), so a nonlinear
map on the code can treat the two regions differently: spread the noise codes without moving the digits'.
This model adds one, residual and starting at zero (so step 0 is the plain DCGAN28):

    code = encoder(x);  code = code + mlp(code);  f(x) = decoder(code)

Any nn.Module trains through the package, so this one runs through `ign-fast train --model`:

    PYTHONPATH=experiments ign-fast train --model code_mapping:MappedDCGAN28 \
        --model-kwargs '{"width": 32, "norm": "group", "hidden": 256, "depth": 2}' ... (the demo's flags)
    PYTHONPATH=experiments ign-fast eval RUN --seed 0|1|2
    PYTHONPATH=experiments python experiments/code_spread.py RUN
"""
import torch
from torch import nn

from ign_fast.models import DCGAN28


class MappedDCGAN28(nn.Module):
    """DCGAN28 with code <- code + mlp(code) between its encoder and decoder; mlp: depth hidden layers of
    `hidden` units (LeakyReLU 0.2), its last layer zero at the start."""

    def __init__(self, in_channels: int = 1, latent_dim: int = 64, width: int = 32, norm: str = "group",
                 hidden: int = 256, depth: int = 2):
        super().__init__()
        self.net = DCGAN28(in_channels=in_channels, latent_dim=latent_dim, width=width, norm=norm)
        layers, size = [], latent_dim
        for _ in range(depth):
            layers += [nn.Linear(size, hidden), nn.LeakyReLU(0.2)]
            size = hidden
        last = nn.Linear(size, latent_dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mapping = nn.Sequential(*layers, last)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        code = self.net.encoder(x)
        flat = code.flatten(1)
        return (flat + self.mapping(flat)).view_as(code)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.net.decoder(code)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
