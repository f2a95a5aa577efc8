"""GraphRunner's bookkeeping, tested on the CPU through a stand-in for the CUDA graph API: warm-up counts,
capture order, that warm-up runs the captured function itself (under HostSyncGuard, so with no host sync),
which tensors persist across replays and graphs, the device guard, the on-device skip of a non-finite update,
and what a loaded optimizer state does to captured graphs. The stand-in "captures" by running the update
once and then putting back every value it changed (a capture records kernels without running them), and
"replays" by running it again on the static inputs and copying the results into the captured outputs,
which is what a replayed graph does to its memory. On a GPU: tests/test_graph_capture.py and
tests/test_fused_step.py compare real graphs against the fused step."""
import contextlib
import copy

import pytest
import torch

import ign_fast
from ign_fast.graph_step import WARMUP_STEPS, GraphRunner, HostSyncGuard, make_capturable

from conftest import SkipMLP, requires_cuda

# the steps run the compiled ops: without the extension they would test the reference path only
pytestmark = pytest.mark.kernels


class StandInGraph:
    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self):
        self.replays += 1
        new = self.fn()
        for key, value in self.out.items():
            self.out[key].copy_(new[key])


class StandInBackend:
    """The CUDA graph API as GraphRunner uses it, on the CPU; it records what the runner asked of it."""

    def __init__(self, model, optimizer):
        self.events = []
        self.model, self.optimizer = model, optimizer

    def device(self, device):
        self.events.append(("device", torch.device(device)))
        return contextlib.nullcontext()

    def prepare_optimizer(self, optimizer):
        make_capturable(optimizer)
        self.events.append(("prepare",))

    def run_eager(self, fn):
        self.events.append(("eager",))
        with HostSyncGuard():  # the warm-up runs what the graph will hold: no host sync there either
            return fn()

    def capture(self, fn):
        self.events.append(("capture",))
        tensors = ([*self.model.parameters(), *self.model.buffers()]
                   + [p.grad for p in self.model.parameters() if p.grad is not None]
                   + [v for st in self.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)])
        saved = [t.clone() for t in tensors]
        with HostSyncGuard():
            out = fn()
        with torch.no_grad():
            for t, value in zip(tensors, saved):
                t.copy_(value)
        return StandInGraph(fn, out), out

    def count(self, kind):
        return sum(1 for e in self.events if e[0] == kind)


def ign_pair(ratio=1.5, lr=1e-2):
    torch.manual_seed(0)
    model = SkipMLP(6).double()
    twin = copy.deepcopy(model)
    loss = ign_fast.IGNLoss("l1", tight_clamp_ratio=ratio)
    fused = ign_fast.IGNStep(twin, torch.optim.Adam(twin.parameters(), lr), loss=loss, mode="fused")
    graph = ign_fast.IGNStep(model, torch.optim.Adam(model.parameters(), lr), loss=loss, mode="fused")
    backend = StandInBackend(graph.model, graph.optimizer)
    graph.graph_runner = GraphRunner(graph.compute_gradients, graph.optimizer, "cpu", backend=backend)
    make_capturable(fused.optimizer)  # capturable Adam keeps float32 step counters: the same math in both
    return graph, fused, backend


def naign_pair(refresh_every, k=2, lr=1e-2):
    torch.manual_seed(0)
    model = SkipMLP(6).double()
    twin = copy.deepcopy(model)
    steps = []
    for m in (model, twin):
        g = torch.Generator().manual_seed(5)
        loss = ign_fast.NAIGNLoss("l1", candidates_per_sample=k, refresh_every=refresh_every)
        steps.append(ign_fast.NAIGNStep(m, torch.optim.Adam(m.parameters(), lr), loss=loss, mode="fused",
                                        sample_noise=lambda n, g=g: torch.randn(n, 6, generator=g,
                                                                                dtype=torch.float64)))
    graph, fused = steps
    backend = StandInBackend(graph.model, graph.optimizer)
    graph.graph_runner = GraphRunner(graph.compute_gradients, graph.optimizer, "cpu", backend=backend)
    make_capturable(fused.optimizer)  # capturable Adam keeps float32 step counters: the same math in both
    return graph, fused, backend


def batches(n, batch=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(batch, 6, generator=g, dtype=torch.float64) * 2 - 1,
             torch.randn(batch, 6, generator=g, dtype=torch.float64)) for _ in range(n)]


def assert_same(model_a, opt_a, model_b, opt_b, tol):
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=tol, atol=tol)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_a.state[pa][key].double().cpu(), opt_b.state[pb][key].double().cpu(),
                                       rtol=tol, atol=tol)


@pytest.mark.parametrize("ratio", [1.5, None])
def test_ign_warms_up_captures_once_and_replays_like_the_fused_step(capturable_on_cpu, ratio):
    graph, fused, backend = ign_pair(ratio)
    for x, z in batches(WARMUP_STEPS + 4):
        assert graph(x, z) == pytest.approx(fused(x, z), rel=1e-10)
    assert backend.count("eager") == WARMUP_STEPS and backend.count("capture") == 1
    (key,) = graph.graph_runner.graphs
    assert graph.graph_runner.graphs[key][0].replays == 4  # the capturing call replays too
    assert graph.optimizer.param_groups[0]["capturable"]
    assert_same(graph.model, graph.optimizer, fused.model, fused.optimizer, 1e-10)


def test_a_new_batch_shape_is_warmed_up_and_captured_anew(capturable_on_cpu):
    graph, fused, backend = ign_pair()
    for x, z in batches(WARMUP_STEPS + 1) + batches(WARMUP_STEPS + 1, batch=3):
        graph(x, z), fused(x, z)
    assert backend.count("eager") == 2 * WARMUP_STEPS and backend.count("capture") == 2
    assert [key[0][0] for key in graph.graph_runner.captures] == [(4, 6), (3, 6)]
    assert_same(graph.model, graph.optimizer, fused.model, fused.optimizer, 1e-10)


def test_gradients_keep_their_memory_across_captures_and_replays(capturable_on_cpu):
    # set to None before a capture, the gradients would be reallocated inside that graph's pool, where
    # another capture could place its own live tensors
    graph, _, _ = ign_pair()
    data = batches(2 * WARMUP_STEPS + 4) + batches(WARMUP_STEPS + 2, batch=3)
    graph(*data[0])
    pointers = [p.grad.data_ptr() for p in graph.model.parameters()]
    for x, z in data[1:]:
        graph(x, z)
        assert [p.grad.data_ptr() for p in graph.model.parameters()] == pointers
    assert len(graph.graph_runner.graphs) == 2


@pytest.mark.parametrize("refresh_every, first_captured", [(1, "refresh"), (2, "refresh"), (3, "reuse"),
                                                           (4, "reuse"), (16, "reuse")])
def test_naign_capture_order_and_candidates_survive_both_graphs(capturable_on_cpu, refresh_every, first_captured):
    graph, fused, backend = naign_pair(refresh_every)
    # enough calls that each graph is captured and then replayed across at least two refreshes
    calls = refresh_every * (WARMUP_STEPS + 3) + 2
    for i, (x, _) in enumerate(batches(calls)):
        fresh = i % refresh_every == 0
        assert graph(x) == pytest.approx(fused(x), rel=1e-12, abs=1e-14), f"call {i}"
        # what the next reuse call searches is f(pool) with the weights of the last refresh, in both steps
        torch.testing.assert_close(graph.candidates, fused.candidates, rtol=1e-12, atol=1e-14)
        if fresh and graph.graph_runner.graphs:
            refresh_key = next((k for k in graph.graph_runner.graphs if len(k) == 2), None)
            if refresh_key is not None:  # the step keeps the refresh graph's own output, not a copy
                assert graph.candidates is graph.graph_runner.graphs[refresh_key][2]["_candidates"]
    kinds = ["refresh" if len(key) == 2 else "reuse" for key in graph.graph_runner.captures]
    assert kinds[0] == first_captured
    assert sorted(kinds) == (["refresh"] if refresh_every == 1 else ["refresh", "reuse"])
    assert_same(graph.model, graph.optimizer, fused.model, fused.optimizer, 1e-12)


def test_every_call_runs_under_the_models_device(capturable_on_cpu):
    graph, _, backend = ign_pair()
    graph.graph_runner.device = torch.device("cpu", 0)  # as cuda:1 would be passed: the runner's, not the default
    n = WARMUP_STEPS + 2
    for x, z in batches(n):
        graph(x, z)
    devices = [e[1] for e in backend.events if e[0] == "device"]
    assert devices == [torch.device("cpu", 0)] * n


def poison(monkeypatch):
    """While the returned switch is on, IGNLoss's total is NaN (a model that blew up)."""
    original = ign_fast.IGNLoss.forward
    switch = {"on": False}

    def forward(self, *args):
        total, *rest = original(self, *args)
        return (total * float("nan") if switch["on"] else total, *rest)

    monkeypatch.setattr(ign_fast.IGNLoss, "forward", forward)
    return switch


@pytest.mark.parametrize("bad_call", [1, 2, WARMUP_STEPS + 1, WARMUP_STEPS + 3])
def test_a_nonfinite_loss_applies_no_update_inside_the_graph(capturable_on_cpu, monkeypatch, bad_call):
    # the first call (no optimizer state yet), a warm-up with state, the capturing call, and a replay
    graph, fused, _ = ign_pair()
    switch = poison(monkeypatch)
    for i, (x, z) in enumerate(batches(WARMUP_STEPS + 5), start=1):
        before = [t.clone() for t in graph.model.parameters()]
        state = copy.deepcopy(graph.optimizer.state_dict()["state"])
        switch["on"] = i == bad_call
        out = graph(x, z)
        switch["on"] = False
        if i == bad_call:
            assert graph.last_skipped and out["loss"] != out["loss"]
            for a, b in zip(before, graph.model.parameters()):
                assert torch.equal(a, b)
            after = graph.optimizer.state_dict()["state"]
            for p_index, p_state in after.items():  # the whole state: moments and step counters
                for key, value in p_state.items():
                    expected = state[p_index][key] if state else torch.zeros_like(value)
                    assert torch.equal(value, expected), (p_index, key)
        else:
            assert not graph.last_skipped
            fused(x, z)
    # the skipped call left no trace: the same weights as a fused step that never saw that batch
    assert_same(graph.model, graph.optimizer, fused.model, fused.optimizer, 1e-10)


def test_a_loaded_optimizer_state_drops_the_graphs_and_is_made_capturable_again(capturable_on_cpu):
    graph, fused, backend = ign_pair()
    data = batches(2 * WARMUP_STEPS + 4)
    for x, z in data[:WARMUP_STEPS + 1]:
        graph(x, z), fused(x, z)
    assert graph.graph_runner.graphs
    saved = copy.deepcopy(fused.optimizer.state_dict())  # state_dict() shares the live tensors; a file would not
    saved["param_groups"][0]["capturable"] = False  # as a fused run on the CPU saves it
    graph.model.load_state_dict(fused.model.state_dict())
    graph.optimizer.load_state_dict(saved)
    assert not graph.graph_runner.graphs and graph.optimizer.param_groups[0]["capturable"]
    for x, z in data[WARMUP_STEPS + 1:]:
        assert graph(x, z) == pytest.approx(fused(x, z), rel=1e-10)
    assert backend.count("capture") == 2
    assert_same(graph.model, graph.optimizer, fused.model, fused.optimizer, 1e-10)


@pytest.mark.parametrize("objective", ["ign", "naign"])
def test_a_graph_steps_optimizer_state_resumes_in_a_fused_step_on_the_cpu(objective):
    # a checkpoint written by mode="graph" carries capturable=True, which Adam refuses for CPU parameters
    torch.manual_seed(0)
    model = SkipMLP(6)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x, z = batches(1)[0]
    x, z = x.float(), z.float()
    make_step = (lambda m, o: ign_fast.IGNStep(m, o, mode="fused")) if objective == "ign" else (
        lambda m, o: ign_fast.NAIGNStep(m, o, loss=ign_fast.NAIGNLoss(candidates_per_sample=2)))
    args = (x, z) if objective == "ign" else (x, torch.randn(8, 6))
    make_step(model, opt)(*args)
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["capturable"] = True  # what a graph step's optimizer saves
    resumed_opt = torch.optim.Adam(model.parameters(), 1e-2)
    step = make_step(model, resumed_opt)
    resumed_opt.load_state_dict(saved)
    assert not resumed_opt.param_groups[0]["capturable"]
    assert all(s["step"].device.type == "cpu" for s in resumed_opt.state.values())
    step(*args)  # refused with "capturable=True ... supported devices" before
    assert all(float(s["step"]) == 2 for s in resumed_opt.state.values())


@requires_cuda
@pytest.mark.parametrize("objective", ["ign", "naign"])
def test_cuda_resume_across_step_modes_and_devices(tmp_path, objective):
    # every direction: fused GPU -> graph GPU -> fused CPU -> graph GPU; each leg captures anew and trains on
    from ign_fast.trainer import TrainConfig, Trainer

    run = str(tmp_path / "run")
    legs = [("cuda", "fused", 6), ("cuda", "graph", 14), ("cpu", "fused", 16), ("cuda", "graph", 24)]
    for i, (device, mode, steps) in enumerate(legs):
        config = TrainConfig(objective=objective, data="moons", model="mlp", batch_size=8, steps=steps,
                             checkpoint_every=2, log_every=1, sample_every=1000, progress=False, out=run,
                             device=device, step_mode=mode)
        trainer = Trainer(config, resume=i > 0)
        summary = trainer.fit()
        assert trainer.step == steps and summary["nonfinite_steps"] == 0
        if mode == "graph":
            assert trainer.step_fn.graph_runner is not None and trainer.step_fn.graph_runner.graphs
        assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_graph_captures_on_the_models_device():
    model = SkipMLP(6).to("cuda:1")
    step = ign_fast.IGNStep(model, torch.optim.Adam(model.parameters(), 1e-2), mode="graph")
    for _ in range(WARMUP_STEPS + 2):  # torch.cuda.current_device() stays 0 throughout
        out = step(torch.randn(4, 6, device="cuda:1"), torch.randn(4, 6, device="cuda:1"))
    assert step.graph_runner.graphs and out["loss"] == out["loss"]
