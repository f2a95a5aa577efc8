"""mode="graph": a fused training step captured whole (forward, backward, optimizer update) as one CUDA graph.

Used by IGNStep (mode="graph") and NAIGNStep (mode="graph"). A step hands GraphRunner its update function,
update(*inputs, sync_free=...) -> dict of 0-dim tensors, which must zero the gradients itself when not
sync_free and leave them alone when sync_free (a captured graph overwrites them on every replay).

Why torch.cuda.graphs rather than torch.compile(mode="reduce-overhead"): the fused IGN step's backward runs
nested autograd (two roles of one forward, see fused_step.py) and the NAIGN step calls a custom search op
between two forwards, both of which dynamo graph-breaks on, while stream capture records whatever kernels
run. Shapes are static per capture: a new set of input shapes is captured anew. The first WARMUP_STEPS calls
for a shape run eagerly on a side stream (cuDNN and the autograd engine allocate lazily, which capture
forbids); they are real training steps on the real batches. The optimizer must be capturable (Adam/AdamW get
capturable=True and device-side step counters). Inside the graph nothing may synchronise with the host;
`HostSyncGuard` checks that on the CPU, where no graph can be captured (tests/test_graph_capture.py).
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
    """Switch Adam/AdamW to capturable, moving their step counters to the parameters' device."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(f"mode='graph' needs a capturable optimizer (Adam or AdamW), got {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        group["capturable"] = True
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state and state["step"].device != p.device:
                state["step"] = state["step"].to(p.device, torch.float32)


class GraphRunner:
    """Runs update(*inputs) as a replayed CUDA graph; one capture per tuple of input shapes and dtypes."""

    def __init__(self, update, optimizer):
        self.update = update
        self.optimizer = optimizer
        self.graphs = {}  # key -> (graph, static inputs, static outputs)
        self.eager_calls = {}
        self.pool = None
        make_capturable(optimizer)

    def _eager(self, inputs):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.update(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, key, inputs):
        static_inputs = tuple(t.clone() for t in inputs)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.update(*static_inputs, sync_free=True)
        self.pool = graph.pool()
        self.graphs[key] = (graph, static_inputs, static_out)

    def __call__(self, *inputs):
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        if key not in self.graphs:
            calls = self.eager_calls.get(key, 0)
            if calls < WARMUP_STEPS:
                self.eager_calls[key] = calls + 1
                return self._eager(inputs)
            self._capture(key, inputs)
        graph, static_inputs, static_out = self.graphs[key]
        for static, t in zip(static_inputs, inputs):
            static.copy_(t)
        graph.replay()
        return static_out


def graph_runner_or_none(model, optimizer, update):
    """A GraphRunner on CUDA; on CPU None, after warning once that mode='graph' runs the eager fused update."""
    global _warned_cpu
    param = next(iter(model.parameters()), None)
    if param is not None and param.device.type == "cuda":
        return GraphRunner(update, optimizer)
    if not _warned_cpu:
        warnings.warn("ign_fast: mode='graph' needs CUDA; running mode='fused' on the CPU", RuntimeWarning,
                      stacklevel=3)
        _warned_cpu = True
    return None
