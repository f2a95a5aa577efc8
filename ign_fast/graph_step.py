"""mode="graph": the fused IGN step captured whole (forward, backward, optimizer update) as one CUDA graph.

Why torch.cuda.graphs rather than torch.compile(mode="reduce-overhead"): the fused step's backward runs
nested autograd (two roles of one forward, see fused_step.py), which dynamo graph-breaks on, while stream
capture records whatever kernels run. Shapes are static per capture: a new (x, z) shape is captured anew.
The first WARMUP_STEPS calls for a shape run eagerly on a side stream (cuDNN and the autograd engine
allocate lazily, which capture forbids); they are real training steps on the real batches. The optimizer
must be capturable (Adam/AdamW get capturable=True and device-side step counters). Inside the graph nothing
may synchronise with the host: the fused backward takes its sync-free path (see SecondApplicationPlan).
On CPU the step falls back to mode="fused" with a one-time warning.
"""
import warnings

import torch

WARMUP_STEPS = 3
_warned_cpu = False


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
    """Runs an IGNStep's fused update as a replayed CUDA graph; one capture per input shape."""

    def __init__(self, step):
        self.step = step
        self.graphs = {}  # (x shape, z shape, dtype) -> (graph, static x, static z, static outputs)
        self.eager_calls = {}
        self.pool = None
        make_capturable(step.optimizer)

    def _eager(self, x, z):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step.run_fused_update(x, z)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, key, x, z):
        static_x, static_z = x.clone(), z.clone()
        graph = torch.cuda.CUDAGraph()
        self.step.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.step.run_fused_update(static_x, static_z, sync_free=True)
        self.pool = graph.pool()
        self.graphs[key] = (graph, static_x, static_z, static_out)

    def __call__(self, x, z):
        key = (tuple(x.shape), tuple(z.shape), x.dtype)
        if key not in self.graphs:
            calls = self.eager_calls.get(key, 0)
            if calls < WARMUP_STEPS:
                self.eager_calls[key] = calls + 1
                return self._eager(x, z)
            self._capture(key, x, z)
        graph, static_x, static_z, static_out = self.graphs[key]
        static_x.copy_(x)
        static_z.copy_(z)
        graph.replay()
        return static_out


def graph_runner_or_none(step):
    """A GraphRunner on CUDA; on CPU None, after warning once that mode='graph' runs as 'fused'."""
    global _warned_cpu
    device = next(step.model.parameters()).device
    if device.type == "cuda":
        return GraphRunner(step)
    if not _warned_cpu:
        warnings.warn("ign_fast: mode='graph' needs CUDA; running mode='fused' on the CPU", RuntimeWarning,
                      stacklevel=3)
        _warned_cpu = True
    return None
