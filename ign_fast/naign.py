"""NAIGN: reconstruction + Implicit Maximum Likelihood Estimation (Al-Jaff et al., 2025).

f fixes the data (f(x) = x) and, for every data point x_i, the nearest of k·B generated samples
G_j = f(z_j) is pulled onto it: loss = λr·mean_i d(f(x_i), x_i) + λ·mean_i d(f(z_j*(i)), x_i), with
j*(i) = argmin_j d(G_j, x_i) under the same distance as the loss. Every data point claims a sample, so no
mode can be dropped; idempotence follows (Lemma 1 of the paper) and an explicit idempotence term is optional.

Choices where the paper is silent, and the sweep behind the defaults: docs/NAIGN.md. In short:
- candidates are generated without autograd and without touching BatchNorm running statistics (the same
  θ' trick as the IGN step), in chunks so memory stays bounded;
- the pool of noise z and its candidates f(z) are made every `refresh_every` = R steps, and between
  refreshes each new data batch is searched among the candidates of the last refresh, as IMLE (Li & Malik,
  2018) recomputes its samples only every so often: the k·B candidate forwards, most of a step's cost, are
  paid once per R steps. The pulled sample f(z*) is always computed with the current θ;
- defaults k = 8 (recall grows with k up to 8 at a moderate cost), λ = 1 (larger λ lowers FID a little but
  projects noisy digits worse: 20 dB at λ = 1, 18 dB at 4, 14.5 dB at 16), R = 4 (R = 1, 4 and 16 are
  within seed noise of each other in FID, coverage and projection; R = 4 makes a step about 2x faster), l1.
"""
import torch
from torch.func import functional_call

from . import ops, reference
from .graph_step import set_capturable
from .step import (apply_update, check_model_matches, check_output, check_step_inputs, frozen_state,
                   has_batch_coupling, read_terms)
from .validation import (check_clamp_ratio, check_distance_kind, check_finite, check_nonnegative_float,
                         check_positive_int)


class NAIGNLoss(torch.nn.Module):
    """Hyperparameters and the loss of NAIGN. loss(x, fx, f_znn, f_f_znn=None) -> (total, rec, imle, idem)."""

    def __init__(self, distance="l1", lambda_rec=1.0, lambda_imle=1.0, lambda_idem=0.0, candidates_per_sample=8,
                 refresh_every=4, lambda_restore=0.0, restore_distance=None, lambda_tight=0.0, tight_clamp_ratio=1.5):
        super().__init__()
        self.distance = check_distance_kind("distance", distance)
        self.lambda_rec = check_nonnegative_float("lambda_rec", lambda_rec)
        self.lambda_imle = check_nonnegative_float("lambda_imle", lambda_imle)
        self.lambda_idem = check_nonnegative_float("lambda_idem", lambda_idem)
        self.candidates_per_sample = check_positive_int("candidates_per_sample", candidates_per_sample)
        self.refresh_every = check_positive_int("refresh_every", refresh_every)
        # weight of d(f(c(x)), x) for corruptions c (NAIGNStep's `corrupt`; ign_fast/corruptions.py)
        self.lambda_restore = check_nonnegative_float("lambda_restore", lambda_restore)
        # its distance (None: `distance`). "l2" aims f's fill of an ambiguous hole at the mean of the digits that
        # fit, which is what PSNR scores best; l1 aims at their median, a sharper guess that is often wrong.
        self.restore_distance = None if restore_distance is None else check_distance_kind("restore_distance",
                                                                                         restore_distance)
        # IGN's tightness term on the pulled samples, -d(f_θ(sg f(z*)), sg f(z*)) clamped by ratio·rec as in
        # IGNLoss: with it (and lambda_idem) the step is an IGN + IMLE hybrid, the IMLE pull searched among
        # NAIGN's k·B candidates (issue 14, docs/IGN.md); 0 is NAIGN
        self.lambda_tight = check_nonnegative_float("lambda_tight", lambda_tight)
        self.tight_clamp_ratio = check_clamp_ratio(tight_clamp_ratio)

    def config(self):
        return {"distance": self.distance, "lambda_rec": self.lambda_rec, "lambda_imle": self.lambda_imle,
                "lambda_idem": self.lambda_idem, "candidates_per_sample": self.candidates_per_sample,
                "refresh_every": self.refresh_every, "lambda_restore": self.lambda_restore,
                "restore_distance": self.restore_distance, "lambda_tight": self.lambda_tight,
                "tight_clamp_ratio": self.tight_clamp_ratio}

    def forward(self, x, fx, f_znn, f_f_znn=None):
        d = self.distance
        rec = ops.per_sample_distance(fx, x, d)
        imle = ops.per_sample_distance(f_znn, x, d)
        if f_f_znn is not None:
            idem = ops.per_sample_distance(f_f_znn, f_znn, d)
        else:
            idem = torch.zeros_like(rec)
        total = self.lambda_rec * rec.mean() + self.lambda_imle * imle.mean() + self.lambda_idem * idem.mean()
        return total, rec, imle, idem


# f runs over the k·B candidates in chunks. On a CPU one chunk of 1,024 DCGAN-28 forwards spills the caches: make
# demo's step (k 16, R 8) took 1.11x the old demo step (k 8, R 4) in chunks of 1,024 and 1.00x in chunks of 256
# (benchmarks/bench_candidates.py, one thread). On a GPU one large chunk is fewer launches. A
# model whose batch statistics couple its samples (BatchNorm in training mode) keeps 1,024 everywhere: for it the
# chunk is part of what f computes, and changing it would change the candidates.
CANDIDATE_CHUNK = 1024
CPU_CANDIDATE_CHUNK = 256


def candidate_chunk_for(model, device):
    """The chunk NAIGNStep uses when it is given none: CPU_CANDIDATE_CHUNK on a CPU for a model without batch
    coupling, else CANDIDATE_CHUNK."""
    if torch.device(device).type == "cpu" and not has_batch_coupling(model):
        return CPU_CANDIDATE_CHUNK
    return CANDIDATE_CHUNK


@torch.no_grad()
def generate_candidates(model, z, chunk_size=CANDIDATE_CHUNK):
    """f(z) with the model's current weights, no autograd, the model's buffers untouched."""
    state = frozen_state(model)
    outs = [functional_call(model, state, (chunk,)) for chunk in z.split(chunk_size)]
    return torch.cat(outs)


NAIGN_STEP_MODES = ("fused", "graph")


class NAIGNStep:
    """One NAIGN update. step(x, z_pool) where z_pool holds k·B noise samples (a fresh pool each call, or
    None to let the step keep and refresh its own pool via `sample_noise`); returns a dict of floats: loss,
    rec, imle, idem, nn_distance.

    mode: "fused" (candidates without autograd, the search by ops.nearest_neighbors, f(x) and f(z*) in one
    call) or "graph" (the same update captured whole as a CUDA graph, see graph_step.py; the pool is drawn
    outside the graph and copied into it; "fused" on CPU). check_inputs: reject NaN/inf in x and z_pool (a
    host sync per step; the trainer checks its data once at load). skip_nonfinite and grad_sync: as in IGNStep
    (a non-finite loss leaves the weights untouched, decided on the device in mode="graph";
    grad_sync averages gradients across ranks between backward and the update). candidate_chunk: how many
    candidates f makes at once (None: candidate_chunk_for, 256 on a CPU, 1,024 elsewhere)."""

    def __init__(self, model, optimizer, loss=None, sample_noise=None, candidate_chunk=None, amp_dtype=None,
                 check_inputs=True, skip_nonfinite=True, mode="fused", corrupt=None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        loss = NAIGNLoss() if loss is None else loss
        if not isinstance(loss, NAIGNLoss):
            raise TypeError(f"loss must be an ign_fast.NAIGNLoss, got {type(loss).__name__}")
        if sample_noise is not None and not callable(sample_noise):
            raise TypeError(f"sample_noise must be callable (n -> noise) or None, got {type(sample_noise).__name__}")
        if candidate_chunk is not None:  # None: candidate_chunk_for(model, the data's device), chosen per call
            candidate_chunk = check_positive_int("candidate_chunk", candidate_chunk)
        if amp_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16, got {amp_dtype!r}")
        for name, flag in (("check_inputs", check_inputs), ("skip_nonfinite", skip_nonfinite)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if mode not in NAIGN_STEP_MODES:
            raise ValueError(f"mode must be one of {NAIGN_STEP_MODES}, got {mode!r}")
        if loss.lambda_restore > 0 and corrupt is None:
            from .corruptions import TrainingCorruptions

            corrupt = TrainingCorruptions()
        if corrupt is not None and not callable(corrupt):
            raise TypeError(f"corrupt must be callable (x -> corrupted x) or None, got {type(corrupt).__name__}")
        self.corrupt = corrupt
        self.model, self.optimizer, self.loss, self.mode = model, optimizer, loss, mode
        self.sample_noise = sample_noise
        self.candidate_chunk = candidate_chunk
        self.amp_dtype = amp_dtype
        self.check_inputs, self.skip_nonfinite = check_inputs, skip_nonfinite
        self.last_skipped = False
        self.grad_sync = None
        # data parallel (set by the trainer under torchrun): a distributed.CandidateGather; the pool is then
        # the global batch's k·B samples, the same on every rank, and the search covers all of it
        self.candidate_gather = None
        self.calls = 0
        self.pool = None
        self.candidates = None  # f(pool) as generated at the pool's last refresh
        self.graph_runner = None
        if mode == "graph":
            from .graph_step import graph_runner_or_none

            self.graph_runner = graph_runner_or_none(model, optimizer, self.compute_gradients, skip_nonfinite)
        if self.graph_runner is None:  # a state dict saved by a graph step comes back capturable: not here
            optimizer.register_load_state_dict_post_hook(lambda opt: set_capturable(opt, False))

    def _pool_for(self, x, z_pool):
        """(pool, fresh): the caller's pool (always fresh), or the step's own, redrawn every R calls."""
        need = self.loss.candidates_per_sample * x.shape[0]
        if self.candidate_gather is not None:
            need *= self.candidate_gather.world_size
        if z_pool is not None:
            check_step_inputs(x, z_pool, check_values=self.check_inputs, z_name="z_pool")
            if z_pool.shape[0] != need:  # a smaller pool silently weakens IMLE's every-point-claims-a-sample
                ranks = "" if self.candidate_gather is None else f" x {self.candidate_gather.world_size} ranks"
                raise ValueError(f"z_pool must hold candidates_per_sample x batch{ranks} = "
                                 f"{self.loss.candidates_per_sample} x {x.shape[0]}{ranks} = {need} noise samples, "
                                 f"got {z_pool.shape[0]}")
            return z_pool, True
        if self.sample_noise is None:
            raise ValueError("z_pool must be given when the step has no sample_noise function")
        if self.pool is None or self.pool.shape[0] != need or self.calls % self.loss.refresh_every == 0:
            pool = self.sample_noise(need)
            if not isinstance(pool, torch.Tensor) or pool.shape[0] != need or pool.shape[1:] != x.shape[1:]:
                got = tuple(pool.shape) if isinstance(pool, torch.Tensor) else type(pool).__name__
                raise ValueError(f"sample_noise({need}) must return a tensor of shape {(need, *x.shape[1:])}, "
                                 f"got {got}")
            self.pool = pool.to(device=x.device, dtype=x.dtype)
            return self.pool, True
        return self.pool, False

    def forward_loss(self, x, z_pool=None):
        """(total, rec, imle, idem, nn_distance) for one batch, with the graph attached. z_pool None: the
        step's own pool (see _pool_for)."""
        return self._loss_terms(x, self._pool_for(x, z_pool)[0])[:5]

    def _loss_terms(self, x, z_pool, candidates=None, sync_free=False):
        # autocast's weight-cast cache would keep tensors from outside a CUDA graph capture: off when capturing
        with torch.autocast(x.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None,
                            cache_enabled=not sync_free):
            return self._forward(x, z_pool, candidates)

    def _forward(self, x, z_pool, candidates=None):
        """The five terms, the candidates searched (made here from a fresh pool when candidates is None), and the
        per-sample restoration and tightness terms (None when their weight is 0)."""
        if candidates is None:
            gather = self.candidate_gather
            own = z_pool if gather is None else gather.local(z_pool)
            chunk = self.candidate_chunk or candidate_chunk_for(self.model, own.device)
            candidates = check_output("candidates f(z_pool)", generate_candidates(self.model, own, chunk), own)
            if gather is not None:
                candidates = gather.gather(candidates)
        index, nn_distance = ops.nearest_neighbors(x, candidates, self.loss.distance)
        z_nn = z_pool.index_select(0, index)
        model = self.model
        restoring = self.loss.lambda_restore > 0
        inputs = [x, z_nn] + ([self.corrupt(x)] if restoring else [])
        if has_batch_coupling(model):
            outputs = [check_output(name, model(t), t) for name, t in zip(("f(x)", "f(z*)", "f(c(x))"), inputs)]
        else:  # one batched call: the same values, fewer launches
            both = torch.cat(inputs)
            outputs = list(check_output("f(x, z)", model(both), both).split(x.shape[0]))
        fx, f_znn = outputs[0], outputs[1]
        f_f_znn = None
        if self.loss.lambda_idem > 0:
            f_f_znn = check_output("f(f(z*))", functional_call(model, frozen_state(model), (f_znn,)), f_znn)
        total, rec, imle, idem = self.loss(x, fx, f_znn, f_f_znn)
        tight = None
        if self.loss.lambda_tight > 0:  # the hybrid's tightness term: f_θ moved off the pulled samples it fixes
            pulled = f_znn.detach()
            tight = -ops.per_sample_distance(check_output("f(f(z*))", model(pulled), pulled), pulled,
                                             self.loss.distance)
            if self.loss.tight_clamp_ratio is not None:
                tight = reference.clamp_tight(tight, rec, self.loss.tight_clamp_ratio)
            total = total + self.loss.lambda_tight * tight.mean()
        restore = None
        if restoring:  # f(c(x)) = x: f learns to undo the corruptions (issue 13)
            restore = ops.per_sample_distance(outputs[2], x, self.loss.restore_distance or self.loss.distance)
            total = total + self.loss.lambda_restore * restore.mean()
        return total, rec, imle, idem, nn_distance, candidates, restore, tight

    def compute_gradients(self, x, z_pool, candidates=None, sync_free=False):
        """Forward and backward on a checked pool (gradients accumulate into .grad); the five terms as 0-dim
        tensors, and under "_candidates" the candidates made from a fresh pool (candidates None), which the
        calls until the next refresh search. With sync_free it never reads a device value on the host (what a
        CUDA graph capture needs)."""
        total, rec, imle, idem, nn_distance, made, restore, tight = self._loss_terms(x, z_pool, candidates,
                                                                                   sync_free)
        total.backward()
        names = ["loss", "rec", "imle", "idem", "nn_distance"]
        terms = [total.detach(), rec.detach().mean(), imle.detach().mean(), idem.detach().mean(),
                 nn_distance.detach().float().mean()]
        for name, term in (("restore", restore), ("tight", tight)):
            if term is not None:
                names.append(name)
                terms.append(term.detach().mean())
        if self.grad_sync is not None:
            terms = self.grad_sync(terms)
        out = dict(zip(names, terms))
        if candidates is None:
            out["_candidates"] = made
        return out

    def run_update(self, x, z_pool, candidates=None, skip_nonfinite=False):
        """One eager update on an explicit pool (and its candidates f(z_pool), generated here when None); the
        terms as 0-dim tensors."""
        return apply_update(self, lambda: self.compute_gradients(x, z_pool, candidates), skip_nonfinite)

    def __call__(self, x, z_pool=None):
        check_step_inputs(x, x, check_values=False)
        check_model_matches(self.model, x)  # before reading values: a tensor on another device may not be readable
        if self.check_inputs:
            check_finite("x", x)
        z_pool, fresh = self._pool_for(x, z_pool)
        inputs = (x, z_pool)
        if not fresh and self.candidates is not None and self.candidates.shape == z_pool.shape:
            inputs = (x, z_pool, self.candidates)  # between refreshes: search the candidates made at the last one
        self.last_skipped = False
        if self.graph_runner is not None:  # a refresh and a reuse call have different inputs: one graph each
            out = self.graph_runner(*inputs)
        else:
            out = self.run_update(*inputs, skip_nonfinite=self.skip_nonfinite)
        if "_candidates" in out:  # a graph's output lives in that graph's own memory pool: safe to keep
            self.candidates = out["_candidates"]
        self.calls += 1
        return read_terms(self, out)
