"""mode="fused" (and "graph") against mode="reference": after K Adam steps the parameters, optimizer
state and buffers agree — float64 to 1e-9 relative, float32 to 1e-5; on a GPU graph against fused to 1e-6."""
import copy

import pytest
import torch

import ign_fast
from ign_fast.models import DCGAN28, DCGAN64, MLP

from conftest import SkipMLP, requires_cuda

# the steps run the compiled ops: without the extension they would test the reference path only
pytestmark = pytest.mark.kernels

K = 5


MODELS = {
    "dcgan28-group": (lambda: DCGAN28(latent_dim=8, width=8, norm="group"), (1, 28, 28)),
    "dcgan28-batch": (lambda: DCGAN28(latent_dim=8, width=8, norm="batch"), (1, 28, 28)),
    "dcgan28-none": (lambda: DCGAN28(latent_dim=8, width=8, norm="none"), (1, 28, 28)),
    "dcgan64-group": (lambda: DCGAN64(latent_dim=8, width=8, norm="group"), (3, 64, 64)),
    "dcgan64-batch": (lambda: DCGAN64(latent_dim=8, width=8, norm="batch"), (3, 64, 64)),
    "dcgan64-none": (lambda: DCGAN64(latent_dim=8, width=8, norm="none"), (3, 64, 64)),
    "mlp": (lambda: MLP(6, hidden=16, depth=2), (6,)),
    "skip": (lambda: SkipMLP(6), (6,)),
}
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}


def run_steps(model, mode, batches, loss, lr=1e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.999))
    step = ign_fast.IGNStep(model, opt, loss=loss, mode=mode)
    losses = [step(x, z)["loss"] for x, z in batches]
    return opt, losses, step


def assert_close_relative(a, b, rtol, what):
    """max|a - b| <= rtol · max|a|: relative error in the max norm, so entries near zero (a gradient that
    cancels) are judged on the tensor's scale rather than their own."""
    scale = a.detach().abs().max().clamp_min(1e-30)
    error = (a.detach() - b.detach()).abs().max()
    assert error <= rtol * scale, f"{what}: max error {error:.3g} > {rtol:g} x scale {scale:.3g}"


def flat(tensors):
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def assert_same_state(model_a, opt_a, model_b, opt_b, rtol):
    # Whole-model vectors: Adam turns a gradient that is zero up to rounding (a conv bias in front of a
    # norm layer) into a full-size step of random sign, so per-tensor relative errors would judge noise.
    assert_close_relative(flat(model_a.parameters()), flat(model_b.parameters()), rtol, "parameters")
    buffers_a = [b for b in model_a.buffers() if b.is_floating_point()]
    if buffers_a:
        buffers_b = [b for b in model_b.buffers() if b.is_floating_point()]
        assert_close_relative(flat(buffers_a), flat(buffers_b), rtol, "buffers")
        assert [int(b) for b in model_a.buffers() if not b.is_floating_point()] == \
            [int(b) for b in model_b.buffers() if not b.is_floating_point()]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert_close_relative(flat(opt_a.state[p][key] for p in model_a.parameters()),
                              flat(opt_b.state[p][key] for p in model_b.parameters()), rtol, key)


def batches_for(shape, dtype, n=K, batch=2):
    g = torch.Generator().manual_seed(1)
    return [(torch.rand((batch, *shape), generator=g, dtype=dtype) * 2 - 1,
             torch.randn((batch, *shape), generator=g, dtype=dtype)) for _ in range(n)]


CASES = ([(name, "l1", 1.5, torch.float64) for name in MODELS]
         + [(name, "l2", None, torch.float64) for name in MODELS]
         + [(name, "l1", None, torch.float64) for name in ("dcgan28-group", "dcgan28-batch", "skip")]
         + [(name, "l2", 1.5, torch.float64) for name in ("dcgan28-group", "dcgan28-batch", "mlp")]
         + [(name, d, r, torch.float32) for name in ("dcgan28-group", "dcgan28-batch", "dcgan28-none", "mlp")
            for d, r in (("l1", 1.5), ("l2", None))])


@pytest.mark.parametrize("name, distance, ratio, dtype", CASES)
def test_fused_matches_reference_after_k_adam_steps(name, distance, ratio, dtype):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    ref_model = make().to(dtype)
    fused_model = copy.deepcopy(ref_model)
    batches = batches_for(shape, dtype)
    loss = ign_fast.IGNLoss(distance, tight_clamp_ratio=ratio)
    ref_opt, ref_losses, _ = run_steps(ref_model, "reference", batches, loss)
    fused_opt, fused_losses, step = run_steps(fused_model, "fused", batches, loss)
    rtol = TOLERANCE[dtype]
    assert fused_losses == pytest.approx(ref_losses, rel=rtol)
    assert_same_state(ref_model, ref_opt, fused_model, fused_opt, rtol)
    # one backward through the second application, except BatchNorm with the clamp on (two VJPs)
    expected_vjps = 2 if (name.endswith("batch") and ratio is not None) else 1
    assert step.last_plan.vjp_count == expected_vjps


def test_saturated_clamp_takes_the_two_vjp_path_and_stays_exact():
    # A tiny clamp ratio saturates tanh: the tight role's per-sample scale underflows to 0, so the idem
    # gradient cannot be recovered by rescaling and the step must take two VJPs.
    torch.manual_seed(0)
    ref_model = DCGAN28(latent_dim=8, width=8, norm="group").double()
    fused_model = copy.deepcopy(ref_model)
    batches = batches_for((1, 28, 28), torch.float64, n=2)
    loss = ign_fast.IGNLoss("l1", tight_clamp_ratio=1e-4)
    ref_opt, ref_losses, _ = run_steps(ref_model, "reference", batches, loss)
    fused_opt, fused_losses, step = run_steps(fused_model, "fused", batches, loss)
    assert step.last_plan.vjp_count == 2
    assert_same_state(ref_model, ref_opt, fused_model, fused_opt, 1e-9)


@pytest.mark.parametrize("weights", [(20.0, 0.0, 2.5), (20.0, 20.0, 0.0), (0.0, 20.0, 2.5)])
def test_fused_with_a_weight_at_zero(weights):
    torch.manual_seed(0)
    ref_model = MLP(6, hidden=16, depth=2).double()
    fused_model = copy.deepcopy(ref_model)
    batches = batches_for((6,), torch.float64, n=3)
    loss = ign_fast.IGNLoss("l1", *weights)
    ref_opt, _, _ = run_steps(ref_model, "reference", batches, loss)
    fused_opt, _, _ = run_steps(fused_model, "fused", batches, loss)
    assert_same_state(ref_model, ref_opt, fused_model, fused_opt, 1e-9)


def test_graph_mode_on_cpu_falls_back_to_fused_with_a_warning():
    import ign_fast.graph_step as graph_step

    graph_step._warned_cpu = False
    torch.manual_seed(0)
    model = MLP(6, hidden=16, depth=2).double()
    fused_model = copy.deepcopy(model)
    batches = batches_for((6,), torch.float64, n=2)
    with pytest.warns(RuntimeWarning, match="mode='graph' needs CUDA"):
        graph_opt, _, _ = run_steps(model, "graph", batches, ign_fast.IGNLoss())
    fused_opt, _, _ = run_steps(fused_model, "fused", batches, ign_fast.IGNLoss())
    assert_same_state(model, graph_opt, fused_model, fused_opt, 0.0 + 1e-15)


@requires_cuda
@pytest.mark.parametrize("name", ["dcgan28-group", "dcgan28-batch", "mlp"])
@pytest.mark.parametrize("ratio", [1.5, None])
def test_cuda_fused_and_graph_match_reference(name, ratio, no_tf32):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    ref_model = make().cuda()
    fused_model, graph_model = copy.deepcopy(ref_model), copy.deepcopy(ref_model)
    batches = [(x.cuda(), z.cuda()) for x, z in batches_for(shape, torch.float32, n=6)]
    loss = ign_fast.IGNLoss("l1", tight_clamp_ratio=ratio)
    ref_opt, _, _ = run_steps(ref_model, "reference", batches, loss)
    fused_opt, _, _ = run_steps(fused_model, "fused", batches, loss)
    graph_opt, _, step = run_steps(graph_model, "graph", batches, loss)
    assert step.graph_runner is not None and step.graph_runner.graphs  # steps 4-6 replayed a captured graph
    assert_same_state(ref_model, ref_opt, fused_model, fused_opt, 1e-4)
    assert_same_state(fused_model, fused_opt, graph_model, graph_opt, 1e-6)


@pytest.mark.parametrize("name", ["dcgan28-group", "dcgan28-batch", "mlp"])
@pytest.mark.parametrize("ratio", [1.5, None])
def test_fused_under_bf16_autocast_is_as_accurate_as_the_reference(name, ratio):
    # bf16 autocast (the GPU default): the model computes in bf16, the loss in the data's float32. The fused
    # step's gradients may differ from float32 by at most twice what the reference step's bf16 gradients do.
    make, shape = MODELS[name]
    torch.manual_seed(0)
    base = make()
    x, z = batches_for(shape, torch.float32, n=1, batch=8)[0]
    grads = {}
    for label, mode, amp in (("fp32", "reference", None), ("ref16", "reference", torch.bfloat16),
                             ("fused16", "fused", torch.bfloat16)):
        model = copy.deepcopy(base)
        step = ign_fast.IGNStep(model, torch.optim.Adam(model.parameters()),
                                ign_fast.IGNLoss("l1", tight_clamp_ratio=ratio),
                                mode=mode, amp_dtype=amp)
        total = step.forward_loss(x, z)[0]
        assert total.dtype == torch.float32
        total.backward()
        grads[label] = flat(p.grad for p in model.parameters())
    scale = grads["fp32"].abs().max()
    ref_error = (grads["ref16"] - grads["fp32"]).abs().max() / scale
    fused_error = (grads["fused16"] - grads["fp32"]).abs().max() / scale
    assert ref_error > 0  # autocast took effect
    assert fused_error <= 2 * ref_error, f"fused bf16 error {fused_error:.3g} vs reference bf16 {ref_error:.3g}"
