"""CUDA-graph capture safety, checked where no GPU is: HostSyncGuard raises on every op that would make a
CUDA device wait for the host, and the updates that mode="graph" captures (graph_step.captured_update for
IGN and NAIGN: in-place zero_grad, forward, backward, the masked capturable Adam step) run whole under it.
On a GPU: NAIGN graph against fused after K steps (IGN's is in test_fused_step.py)."""
import copy

import pytest
import torch

import ign_fast
from ign_fast.graph_step import HostSyncError, HostSyncGuard, captured_update, make_capturable
from ign_fast.models import DCGAN28, MLP

from conftest import SkipMLP, requires_cuda
from test_fused_step import MODELS, assert_same_state, batches_for

# the steps run the compiled ops: without the extension they would test the reference path only
pytestmark = pytest.mark.kernels


@pytest.mark.parametrize("name, fn", [
    ("item", lambda t: t.sum().item()),
    ("float", lambda t: float(t.sum())),
    ("bool", lambda t: bool((t > 0).any())),
    ("nonzero", lambda t: t.nonzero()),
    ("boolean mask", lambda t: t[t > 0]),
    ("masked_select", lambda t: t.masked_select(t > 0)),
    ("tensor from python data", lambda t: t + torch.tensor([1.0, 2.0, 3.0])),
    ("unique", lambda t: t.unique()),
])
def test_guard_catches_host_syncs(name, fn):
    t = torch.randn(3)
    fn(t)  # fine outside the guard
    with pytest.raises(HostSyncError, match="synchronises with the host"), HostSyncGuard():
        fn(t)


def test_guard_lets_device_side_code_through():
    t = torch.randn(4, 3, requires_grad=True)
    with HostSyncGuard():
        index = t.detach().abs().sum(1).argmin().reshape(1)
        y = torch.where(t > 0, t, 0.1 * t).index_select(0, index).sum() + t[torch.arange(2)].mean()
        y.backward()
        torch.nn.functional.mse_loss(t, torch.zeros_like(t)).backward()
    assert t.grad is not None


def test_guard_sees_inside_a_custom_backward():
    # the fused IGN step's eager per-sample-ratio path reads a bool in its backward: the guard must see it
    torch.manual_seed(0)
    model = MLP(6, hidden=16, depth=2)
    step = ign_fast.IGNStep(model, torch.optim.Adam(model.parameters()), ign_fast.IGNLoss("l1", tight_clamp_ratio=1.5),
                            mode="fused")
    x, z = torch.rand(4, 6) * 2 - 1, torch.randn(4, 6)
    with pytest.raises(HostSyncError), HostSyncGuard():
        step.compute_gradients(x, z)
    assert step.last_plan.vjp_count == 0  # it stopped inside the backward, before any VJP


IGN_CASES = [(name, d, r) for name in ("dcgan28-group", "dcgan28-batch", "dcgan28-none", "mlp", "skip")
             for d, r in (("l1", 1.5), ("l2", None))] + [("dcgan64-group", "l1", 1.5)]


@pytest.mark.parametrize("name, distance, ratio", IGN_CASES)
def test_ign_captured_update_has_no_host_sync(capturable_on_cpu, name, distance, ratio):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make()
    step = ign_fast.IGNStep(model, torch.optim.Adam(model.parameters()),
                            ign_fast.IGNLoss(distance, tight_clamp_ratio=ratio),
                            mode="fused", check_inputs=False)
    make_capturable(step.optimizer)
    x, z = batches_for(shape, torch.float32, n=1, batch=3)[0]
    before = [p.detach().clone() for p in model.parameters()]
    with HostSyncGuard():
        out = captured_update(step.compute_gradients, step.optimizer, (x, z), skip_nonfinite=True)
        captured_update(step.compute_gradients, step.optimizer, (x, z), skip_nonfinite=True)  # with state
    assert all(p.grad is not None for p in model.parameters())
    assert torch.isfinite(out["loss"]) and not out["_skipped"]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the update was applied


def test_ign_captured_update_under_bf16_autocast_has_no_host_sync(capturable_on_cpu):
    torch.manual_seed(0)
    model = DCGAN28(latent_dim=8, width=8, norm="group")
    step = ign_fast.IGNStep(model, torch.optim.Adam(model.parameters()), mode="fused", amp_dtype=torch.bfloat16,
                            check_inputs=False)
    make_capturable(step.optimizer)
    x, z = batches_for((1, 28, 28), torch.float32, n=1, batch=3)[0]
    with HostSyncGuard():
        captured_update(step.compute_gradients, step.optimizer, (x, z), skip_nonfinite=True)


def naign_step(model, mode="fused", distance="l1", lambda_idem=0.0, k=3, amp_dtype=None):
    loss = ign_fast.NAIGNLoss(distance, lambda_idem=lambda_idem, candidates_per_sample=k)
    return ign_fast.NAIGNStep(model, torch.optim.Adam(model.parameters(), lr=1e-3), loss=loss, mode=mode,
                              amp_dtype=amp_dtype, check_inputs=False)


@pytest.mark.parametrize("name", ["dcgan28-group", "dcgan28-batch", "mlp", "skip"])
@pytest.mark.parametrize("distance, lambda_idem", [("l1", 0.0), ("l2", 1.0)])
def test_naign_captured_update_has_no_host_sync(capturable_on_cpu, name, distance, lambda_idem):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make()
    step = naign_step(model, distance=distance, lambda_idem=lambda_idem)
    make_capturable(step.optimizer)
    x = batches_for(shape, torch.float32, n=1, batch=4)[0][0]
    pool = torch.randn(12, *shape)
    with HostSyncGuard():
        out = captured_update(step.compute_gradients, step.optimizer, (x, pool), skip_nonfinite=True)
        # a call between pool refreshes searches the candidates the refresh returned
        captured_update(step.compute_gradients, step.optimizer, (x, pool, out["_candidates"]), skip_nonfinite=True)
    assert all(p.grad is not None for p in model.parameters())
    assert set(out) == {"loss", "rec", "imle", "idem", "nn_distance", "_candidates", "_skipped"}


def test_naign_captured_update_under_bf16_autocast_has_no_host_sync(capturable_on_cpu):
    torch.manual_seed(0)
    model = DCGAN28(latent_dim=8, width=8, norm="group")
    step = naign_step(model, amp_dtype=torch.bfloat16)
    make_capturable(step.optimizer)
    x, pool = torch.rand(4, 1, 28, 28) * 2 - 1, torch.randn(12, 1, 28, 28)
    with HostSyncGuard():
        captured_update(step.compute_gradients, step.optimizer, (x, pool), skip_nonfinite=True)


def run_naign(model, mode, batches, k=3, refresh_every=None):
    """K steps on given pools, or (refresh_every set) on the step's own pool, redrawn every R steps."""
    step = naign_step(model, mode=mode, k=k)
    g = torch.Generator(device=batches[0].device).manual_seed(5)
    draw = lambda n: torch.randn(n, *batches[0].shape[1:], generator=g, device=batches[0].device,  # noqa: E731
                                 dtype=batches[0].dtype)
    if refresh_every is None:
        return step, [step(x, draw(k * x.shape[0]))["loss"] for x in batches]
    step.loss.refresh_every, step.sample_noise = refresh_every, draw
    return step, [step(x)["loss"] for x in batches]


def test_cpu_fallback_of_naign_graph_mode_is_the_fused_step_with_a_warning():
    # what this tests: the CPU fallback, not a graph (the graph's logic: test_graph_runner.py)
    import ign_fast.graph_step as graph_step

    graph_step._warned_cpu = False
    torch.manual_seed(0)
    model = SkipMLP(6).double()
    fused_model = copy.deepcopy(model)
    batches = [x for x, _ in batches_for((6,), torch.float64, n=3)]
    with pytest.warns(RuntimeWarning, match="mode='graph' needs CUDA"):
        graph_step_, graph_losses = run_naign(model, "graph", batches)
    fused_step_, fused_losses = run_naign(fused_model, "fused", batches)
    assert graph_step_.graph_runner is None
    assert graph_losses == fused_losses
    assert_same_state(model, graph_step_.optimizer, fused_model, fused_step_.optimizer, 1e-15)


def test_naign_step_rejects_an_unknown_mode():
    model = MLP(2)
    with pytest.raises(ValueError, match="mode must be one of"):
        ign_fast.NAIGNStep(model, torch.optim.Adam(model.parameters()), mode="reference")


@requires_cuda
@pytest.mark.parametrize("name", ["dcgan28-group", "dcgan28-batch", "mlp"])
@pytest.mark.parametrize("refresh_every", [None, 1, 2, 3, 4, 16])
def test_cuda_naign_graph_matches_fused(name, refresh_every, no_tf32):
    # R >= 3 captures the reuse graph before the refresh graph: with one shared memory pool the refresh
    # graph's candidates could sit in the reuse graph's scratch memory and be overwritten on every replay
    make, shape = MODELS[name]
    torch.manual_seed(0)
    fused_model = make().cuda()
    graph_model = copy.deepcopy(fused_model)
    # enough calls that both graphs are captured and then replayed across at least two refreshes
    n = 6 if refresh_every is None else refresh_every * 6 + 2
    batches = [x.cuda() for x, _ in batches_for(shape, torch.float32, n=n, batch=4)]
    fused_step_, fused_losses = run_naign(fused_model, "fused", batches, refresh_every=refresh_every)
    graph_step_, graph_losses = run_naign(graph_model, "graph", batches, refresh_every=refresh_every)
    assert graph_step_.graph_runner is not None and graph_step_.graph_runner.graphs  # steps 4-6 were replays
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(fused_losses), rtol=1e-5, atol=1e-7)
    assert_same_state(fused_model, fused_step_.optimizer, graph_model, graph_step_.optimizer, 1e-6)
