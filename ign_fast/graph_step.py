"""mode="graph": a fused training step captured whole (forward, backward, optimizer update) as one CUDA graph.

Used by IGNStep (mode="graph") and NAIGNStep (mode="graph"). A step hands GraphRunner its
compute_gradients(*inputs, sync_free=True) -> dict of 0-dim tensors (keys starting with "_" carry tensors
that are not loss terms, e.g. NAIGN's fresh candidates); GraphRunner owns the rest of the update.

Why torch.cuda.graphs rather than torch.compile(mode="reduce-overhead"): the fused IGN step's backward runs
nested autograd (two roles of one forward, see fused_step.py) and the NAIGN step calls a custom search op
between two forwards, both of which dynamo graph-breaks on, while stream capture records whatever kernels
run. Shapes are static per capture: a new set of input shapes is captured anew.

What the runner guarantees, and why (issue 11):
- One update function for warm-up and capture (`captured_update`): the first WARMUP_STEPS calls for a shape
  run it eagerly on a side stream (cuDNN and the autograd engine allocate lazily, which capture forbids),
  then the same function is captured, so no code runs for the first time inside a capture.
- Memory that outlives a replay is never in another capture's pool: every graph gets a private memory pool
  (NAIGN's refresh graph returns the candidates that the reuse graph searches; in a shared pool, one graph's
  scratch could be placed on the other's live output). Gradients are zeroed in place inside the graph, not
  set to None before a capture, so they keep the memory the eager warm-up gave them, shared by all graphs.
- A non-finite loss applies no update: the graph decides on the device (torch.where against a copy of the
  weights and the optimizer state taken before optimizer.step()), as the fused mode skips it on the host.
  The copy costs one read and write of the parameters and optimizer state per step.
- The optimizer is made capturable before every warm-up and capture, and `optimizer.load_state_dict` (a resumed
  checkpoint restores capturable=False and CPU step counters, and replaces the state tensors the graphs point
  at) drops the captured graphs, which are then warmed up and captured again.
- Every call runs under `torch.cuda.device(<the model's device>)`, so --device cuda:1 captures on cuda:1.
Inside the graph nothing may synchronise with the host; `HostSyncGuard` checks that on the CPU, where no graph
can be captured (tests/test_graph_capture.py), and `GraphRunner(backend=...)` takes a stand-in for the CUDA
graph API, so the runner's bookkeeping is tested on the CPU too (tests/test_graph_runner.py).
On CPU the step falls back to its eager fused update with a one-time warning.
"""
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

WARMUP_STEPS = 3
_warned_cpu = False

# ATen ops that wait for the device on CUDA: reading a value on the host, or sizing an output by the data.
# Stream capture fails on the first of them (or, for a copy to pageable host memory, records garbage).
HOST_SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,   # .item(), float(t), bool(t), int(t)
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.nonzero_static.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.unique_dim.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_consecutive.default,
    torch.ops.aten.bincount.default,
    torch.ops.aten.repeat_interleave.Tensor,
    torch.ops.aten.lift_fresh.default,            # torch.tensor(python data): a host-to-device copy on CUDA
}


class HostSyncError(RuntimeError):
    """An op that would synchronise with the host ran where a CUDA graph will be captured."""


class HostSyncGuard(TorchDispatchMode):
    """Raise HostSyncError on any op that would make a CUDA device wait for the host: value reads
    (.item(), float(), bool()), data-dependent output sizes (nonzero, boolean-mask indexing, unique), and
    tensors made from Python data. Works on CPU tensors, so capture safety is tested where no GPU is."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_mask = func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                             torch.ops.aten.index_put_.default) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
        if func in HOST_SYNC_OPS or bool_mask:
            raise HostSyncError(f"{func} synchronises with the host; it cannot run inside a CUDA graph capture")
        return func(*args, **kwargs)


def make_capturable(optimizer):
    """Switch Adam/AdamW to capturable, moving their step counters to the parameters' device as float32."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(f"mode='graph' needs a capturable optimizer (Adam or AdamW), got {type(optimizer).__name__}")
    set_capturable(optimizer, True)


def set_capturable(optimizer, capturable):
    """Set `capturable` on every param group that has the option, with the step counters where that mode
    keeps them (capturable: on the parameter's device; otherwise on the CPU). A checkpoint written by a graph
    step and resumed by a fused one, or the other way round, comes back with the other mode's flags:
    capturable Adam refuses CPU parameters, and a captured Adam needs device-side counters."""
    for group in optimizer.param_groups:
        if "capturable" not in group:
            continue
        group["capturable"] = capturable
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                device = p.device if capturable else torch.device("cpu")
                if step.device != device:
                    state["step"] = step.to(device, torch.float32)


def optimizer_tensors(optimizer):
    """The parameters and every tensor of the optimizer's state, in a fixed order."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = [v for p in params for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return params, state


@torch.no_grad()
def masked_optimizer_step(optimizer, apply):
    """optimizer.step() that takes effect only where the 0-dim bool tensor `apply` is true, decided on the
    device (no host read): the parameters and state are copied before the step and put back with
    torch.where. State the step creates (its first call) goes back to zeros, Adam's initial state."""
    params, state = optimizer_tensors(optimizer)
    before = [t.clone() for t in params + state]
    optimizer.step()
    _, after_state = optimizer_tensors(optimizer)
    known = {id(t) for t in params + state}
    for t, old in zip(params + state, before):
        t.copy_(torch.where(apply, t, old))
    for t in after_state:
        if id(t) not in known:
            t.copy_(torch.where(apply, t, torch.zeros_like(t)))


def captured_update(compute_gradients, optimizer, inputs, skip_nonfinite):
    """The update a graph holds, run eagerly for warm-up too: gradients zeroed in place, forward and backward
    without host reads, then the optimizer step (masked by the loss's finiteness with skip_nonfinite). Returns
    the terms plus "_skipped", a 0-dim bool tensor."""
    optimizer.zero_grad(set_to_none=False)
    out = dict(compute_gradients(*inputs, sync_free=True))
    finite = torch.isfinite(out["loss"])
    if skip_nonfinite:
        masked_optimizer_step(optimizer, finite)
    else:
        optimizer.step()
    out["_skipped"] = torch.logical_not(finite) if skip_nonfinite else torch.zeros_like(finite)
    return out


class CUDAGraphBackend:
    """What GraphRunner needs of CUDA: a device context, eager runs on a side stream, capture and replay."""

    def device(self, device):
        return torch.cuda.device(device)

    def prepare_optimizer(self, optimizer):
        make_capturable(optimizer)

    def run_eager(self, fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream().wait_stream(side)
        return out

    def capture(self, fn):
        """(graph, outputs): no pool argument, so the graph gets a private memory pool (see the docstring)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        return graph, out


class GraphRunner:
    """Runs a step's update as a replayed CUDA graph; one capture per tuple of input shapes and dtypes."""

    def __init__(self, compute_gradients, optimizer, device, skip_nonfinite=True, backend=None):
        self.compute_gradients = compute_gradients
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.skip_nonfinite = skip_nonfinite
        self.backend = backend if backend is not None else CUDAGraphBackend()
        self.graphs = {}  # key -> (graph, static inputs, static outputs)
        self.eager_calls = {}
        self.captures = []  # keys in capture order, for tests and for the GPU check's log
        self.backend.prepare_optimizer(optimizer)
        # a loaded state dict replaces the tensors the graphs point at and restores its own flags
        self._hook = optimizer.register_load_state_dict_post_hook(lambda opt: self.reset())

    def reset(self):
        """Forget every captured graph: the next calls warm up and capture again."""
        self.graphs.clear()
        self.eager_calls.clear()
        self.backend.prepare_optimizer(self.optimizer)

    def _update(self, inputs):
        return captured_update(self.compute_gradients, self.optimizer, inputs, self.skip_nonfinite)

    def __call__(self, *inputs):
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        with self.backend.device(self.device):
            if key not in self.graphs:
                calls = self.eager_calls.get(key, 0)
                if calls < WARMUP_STEPS:
                    self.eager_calls[key] = calls + 1
                    self.backend.prepare_optimizer(self.optimizer)
                    return self.backend.run_eager(lambda: self._update(inputs))
                self.backend.prepare_optimizer(self.optimizer)
                static_inputs = tuple(t.clone() for t in inputs)  # outside any pool: live as long as the graph
                graph, static_out = self.backend.capture(lambda: self._update(static_inputs))
                self.graphs[key] = (graph, static_inputs, static_out)
                self.captures.append(key)
            graph, static_inputs, static_out = self.graphs[key]
            for static, t in zip(static_inputs, inputs):
                static.copy_(t)
            graph.replay()
            return static_out


def graph_runner_or_none(model, optimizer, compute_gradients, skip_nonfinite=True):
    """A GraphRunner on CUDA; on CPU None, after warning once that mode='graph' runs the eager fused update."""
    global _warned_cpu
    param = next(iter(model.parameters()), None)
    if param is not None and param.device.type == "cuda":
        return GraphRunner(compute_gradients, optimizer, param.device, skip_nonfinite)
    if not _warned_cpu:
        warnings.warn("ign_fast: mode='graph' needs CUDA; running mode='fused' on the CPU", RuntimeWarning,
                      stacklevel=3)
        _warned_cpu = True
    return None
