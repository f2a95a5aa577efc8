"""Training actually learns: 300 IGN steps on MNIST-5k lower rec and idem, and samples differ.

Margins, from runs of this configuration (BatchNorm DCGAN 28, width 16, batch 32, lr 1e-3): rec starts near
the mean |x| of MNIST in [-1, 1] (0.72) and ends near 0.26, so it must fall below half its start; idem
peaks early (0.31, the tight term pushes f(f(z)) away from f(z)) and ends near 0.06, so its last values
must be below half its peak. IGN this early is close to collapse (the foundation issue's measurements): the
mean pairwise l1 distance between generated digits is about 6% of that between real digits with BatchNorm
sampling, and 0.03% for a GroupNorm model that collapsed to one glyph; the test asks for more than 2%, so
it fails on a total collapse, not on IGN's known partial one.
"""
import torch

from ign_fast.trainer import TrainConfig, Trainer
from ign_fast.inference import generate


def test_300_ign_steps_on_mnist5k_learn(tmp_path):
    config = TrainConfig(objective="ign", steps=300, batch_size=32, lr=1e-3, latent_dim=32, width=16, norm="batch",
                         out=str(tmp_path / "run"), progress=False, log_every=10, sample_every=1000,
                         checkpoint_every=1000)
    trainer = Trainer(config)
    trainer.fit()
    rows = trainer.metrics.rows
    rec = [float(r["rec"]) for r in rows]
    idem = [float(r["idem"]) for r in rows]
    assert rec[-1] < 0.5 * rec[0], rec
    assert min(idem[-5:]) < 0.5 * max(idem), idem
    with torch.no_grad():
        z = trainer.prior.sample(64, generator=torch.Generator().manual_seed(0))
        samples = generate(trainer.model, z).flatten(1)
    real = trainer.data[:64].flatten(1)
    spread = torch.cdist(samples, samples, p=1).mean() / samples.shape[1]
    real_spread = torch.cdist(real, real, p=1).mean() / real.shape[1]
    assert spread > 0.02 * real_spread, (spread, real_spread)
