"""A noise prior fitted to the data's principal components, tried as NAIGN's prior (issue 14, docs/NAIGN.md).

The DCGAN's codes of Gaussian noise vary along about 8 directions (participation ratio of their covariance
7.7, against 20.9 for its codes of real digits), so f(z) is a generator of about 8 dimensions. A prior whose
samples vary as the data do (its mean, its top R principal directions with their variances, and isotropic noise
for the rest of the variance) may give codes that vary as the digits' codes do.

    python experiments/priors.py train OUT SEED RANK [--no-residual] [ign-fast train flags]   # the demo's recipe
    python experiments/priors.py eval RANK OUT [ign-fast eval flags]
    python experiments/priors.py spread RANK OUT     # experiments/code_spread.py on a run trained with this prior
"""
import sys

import torch

import ign_fast.noise as noise
import ign_fast.trainer as trainer_module
from ign_fast import cli
from ign_fast.data import load_mnist5k

DEMO_FLAGS = ["--lambda-imle", "4", "--lambda-restore", "0.5", "--restore-corruptions", "noise", "--lr", "2e-3",
              "--candidates", "16", "--refresh-every", "8"]


class PCAPrior(noise.NoisePrior):
    """z = mean + U diag(s) ε_R + σ ε: the data's mean, its top `rank` principal directions U with their standard
    deviations s, and isotropic noise σ carrying the remaining variance (mean over the other directions)."""

    kind = "pca"

    def __init__(self, shape, rank=32, residual=True):
        super().__init__(shape)
        dim = int(torch.tensor(self.shape).prod())
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("directions", torch.zeros(dim, rank))
        self.register_buffer("stds", torch.zeros(rank))
        self.register_buffer("residual_std", torch.zeros(()))
        self.residual = residual

    @classmethod
    @torch.no_grad()
    def fit(cls, data, rank, residual=True):
        flat = data.flatten(1).double()
        prior = cls(tuple(data.shape[1:]), rank, residual)
        mean = flat.mean(0)
        eigenvalues, vectors = torch.linalg.eigh(torch.cov((flat - mean).T))
        eigenvalues, vectors = eigenvalues.flip(0).clamp_min(0), vectors.flip(1)
        prior.mean.copy_(mean.float())
        prior.directions.copy_(vectors[:, :rank].float())
        prior.stds.copy_(eigenvalues[:rank].sqrt().float())
        rest = eigenvalues[rank:]
        prior.residual_std.fill_(float(rest.mean().sqrt()) if rest.numel() and residual else 0.0)
        return prior

    def sample(self, n, generator=None, device=None, dtype=torch.float32):
        device = torch.device(device) if device is not None else self._default_device()
        rank = self.stds.shape[0]
        eps = self._standard_normal(n, generator, device, dtype, (rank + self.mean.shape[0],))
        z = self.mean + (eps[:, :rank] * self.stds) @ self.directions.T + self.residual_std * eps[:, rank:]
        return z.view(n, *self.shape)


def register(rank, residual=True):
    """Make "pca" a prior kind everywhere ign_fast looks one up: fitted (to all 4,000 training digits) when a run
    starts, rebuilt from its buffers when a checkpoint loads."""
    noise._PRIORS["pca"] = lambda shape: PCAPrior(shape, rank, residual)
    noise.PRIOR_KINDS = trainer_module.PRIOR_KINDS = noise.PRIOR_KINDS + ("pca",)
    build = noise.build_prior

    def build_prior(kind_or_config, data=None, shape=None, state_dict=None):
        if kind_or_config == "pca":
            return PCAPrior.fit(load_mnist5k("train")[0], rank, residual)
        return build(kind_or_config, data=data, shape=shape, state_dict=state_dict)

    trainer_module.build_prior = build_prior


def rank_of(text):
    """RANK as a positive int, or exit with one line."""
    if not text.isdigit() or int(text) < 1:
        sys.exit(f"priors.py: error: RANK must be a positive int (principal directions kept), got {text!r}")
    return int(text)


def main():
    if len(sys.argv) < 4 or sys.argv[1] not in ("train", "eval", "spread") or (sys.argv[1] == "train"
                                                                              and len(sys.argv) < 5):
        sys.exit(__doc__)
    if sys.argv[1] == "train":
        out, seed, rank, extra = sys.argv[2], sys.argv[3], rank_of(sys.argv[4]), sys.argv[5:]
        residual = "--no-residual" not in extra
        extra = [a for a in extra if a != "--no-residual"]
        register(rank, residual)
        code = cli.main(["train", "--out", out, "--seed", seed, "--steps", "2000", "--sample-every", "500",
                         "--checkpoint-every", "500", "--no-progress", "--prior", "pca", *DEMO_FLAGS, *extra])
    elif sys.argv[1] == "eval":
        register(rank_of(sys.argv[2]))
        code = cli.main(["eval", *sys.argv[3:]])
    else:
        import code_spread  # experiments/, next to this file

        register(rank_of(sys.argv[2]))
        sys.argv = ["code_spread.py", *sys.argv[3:]]
        code = code_spread.main()
    sys.exit(code)


if __name__ == "__main__":
    main()
