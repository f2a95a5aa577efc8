"""Data-parallel training across processes started by torchrun (or anything that sets its variables).

`torchrun --nproc_per_node N -m ign_fast train ...` starts N copies of the trainer with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set. `init_from_env` turns those into a process group (gloo for CPU
training, nccl for CUDA, one GPU per local rank); a plain `python -m ign_fast train` has no WORLD_SIZE and
runs single-process, exactly as before.

Why a gradient all-reduce after backward rather than torch.nn.parallel.DistributedDataParallel's
forward-driven reducer: DDP learns which gradients to reduce from the calls made through its forward and
reduces them from hooks on each parameter's gradient accumulator. The IGN steps break both assumptions:
  - mode="reference" calls the model four times per step, one of them through torch.func.functional_call
    on detached parameters (θ'), which no parameter hook sees;
  - mode="fused" runs the second application inside a custom autograd Function and takes its parameter
    gradient with torch.autograd.grad (ign_fast/fused_step.py), returned through the Function's inputs;
  - mode="graph" replays a captured CUDA graph, where DDP would need static_graph and a capture-safe reducer;
  - NAIGN generates candidates under no_grad through functional_call, then calls the model once more.
Routing those through DDP needs find_unused_parameters, no_sync juggling and trust that each hook fires
exactly once. Instead every mode computes the full local gradient of its local mean loss into p.grad as in a
single process, and `GradientAverager` then averages all of them across ranks in one flat all-reduce,
between backward and optimizer.step: exactly one reduction per step in every mode, by construction. Since
the loss is a mean over samples and every rank holds B/R samples of the global batch B, the average of the
ranks' gradients is the gradient of the global batch's loss (for models without BatchNorm, whose output for
a sample does not depend on the rest of its batch).

The noise is one stream shared by all ranks: each draws the global batch's noise and keeps its slice, and
NAIGN's candidates are made 1/R per rank and gathered (CandidateGather), so with such models R ranks train
exactly what one process on the global batch trains, and a checkpoint resumes at any world size.
"""
import atexit
import datetime
import os

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=10)


class DistContext:
    """Where this process stands: rank, world size, local rank, and whether a group was started here."""

    def __init__(self, rank=0, world_size=1, local_rank=0, backend=None):
        self.rank, self.world_size, self.local_rank, self.backend = rank, world_size, local_rank, backend

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def broadcast_module(self, module):
        """Rank 0's parameters and buffers onto every rank, so all replicas start identical."""
        if not self.enabled:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)

    def destroy(self):
        if self.enabled:
            destroy()


def destroy():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


SINGLE = DistContext()


def _env_int(name, default=None):
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None


def init_from_env(device_name="auto"):
    """A DistContext from torchrun's variables; starts the process group when WORLD_SIZE > 1.

    device_name is the trainer's --device: "cpu" trains over gloo, "auto"/"cuda" over nccl with rank r on
    cuda:LOCAL_RANK. Returns (context, device name to train on)."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be >= 1, got {world_size}")
    if world_size == 1:
        return SINGLE, device_name
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", 0)
    if rank is None or not 0 <= rank < world_size:
        raise ValueError(f"environment variable RANK must be in [0, {world_size}) when WORLD_SIZE is set, got "
                         f"{os.environ.get('RANK')!r}")
    use_cuda = device_name != "cpu" and (device_name.startswith("cuda") or torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device {device_name!r} was asked for but CUDA is not available")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: {torch.cuda.device_count()} visible")
        torch.cuda.set_device(local_rank)
        device_name, backend = f"cuda:{local_rank}", "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=TIMEOUT)
        atexit.register(destroy)  # also on error paths: torch warns about a group left undestroyed
    return DistContext(rank, world_size, local_rank, backend), device_name


class CandidateGather:
    """NAIGN's candidate search across ranks, so a data-parallel run searches what one process would.

    Every rank draws the same global pool of k·B noise samples (the trainer's noise stream is shared), makes
    the candidates f(z) of its own contiguous 1/R of it, and `gather` puts the R pieces back together in rank
    order: each rank then matches its B/R data points against all k·B candidates, as one process with the
    global batch B does (a per-rank pool would search only k·B/R). Generating candidates stays split R ways;
    the cost is one all-gather of the candidates per pool refresh and the global pool held on every rank."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size

    def local(self, pool):
        """This rank's slice of the global pool (the pool's size is k·B, a multiple of R)."""
        n = pool.shape[0] // self.world_size
        return pool[self.rank * n:(self.rank + 1) * n]

    def gather(self, candidates):
        """The candidates of every rank's slice, concatenated in rank order."""
        parts = [torch.empty_like(candidates) for _ in range(self.world_size)]
        dist.all_gather(parts, candidates.contiguous())
        return torch.cat(parts)


class GradientAverager:
    """Averages the gradients of `params` (and a few 0-dim loss terms) across ranks in one all-reduce.

    Called by the steps between backward and optimizer.step (their `grad_sync` hook). The loss terms ride
    in the same buffer, so every rank gets the global batch's loss: rank 0 logs it, and every rank takes the
    same skip decision for a non-finite step (a NaN on any rank makes the average NaN everywhere)."""

    def __init__(self, params, world_size):
        self.params = [p for p in params if p.requires_grad]
        self.world_size = world_size
        self.calls = 0  # all-reduces issued, for tests: exactly one per step

    def __call__(self, terms):
        grads, had_grad = [], []
        for p in self.params:
            had_grad.append(p.grad is not None)
            if p.grad is None:  # reached on another rank maybe: takes part as zeros, so the layouts agree
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        # one dtype for the flat buffer: the gradients' own when they agree (float64 stays exact)
        dtype = grads[0].dtype if all(g.dtype == grads[0].dtype for g in grads) else torch.float32
        device = grads[0].device
        scalars = torch.stack([t.detach().to(device, dtype).reshape(()) for t in terms])
        if all(had_grad):  # the usual case, and the only one inside a CUDA graph capture: no host copy there
            flags = torch.ones(len(had_grad), dtype=dtype, device=device)
        else:
            flags = torch.tensor(had_grad, dtype=dtype, device=device)
        flat = torch.cat([g.reshape(-1).to(dtype) for g in grads] + [scalars, flags])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g)).div_(self.world_size)
            offset += n
        scalars = flat[offset:offset + len(terms)] / self.world_size
        if not all(had_grad):
            # a parameter no rank reached keeps grad None, as in one process (Adam then leaves it alone)
            reached = flat[offset + len(terms):].tolist()
            for p, count in zip(self.params, reached):
                if count == 0:
                    p.grad = None
        self.calls += 1
        return [scalars[i] for i in range(len(terms))]
