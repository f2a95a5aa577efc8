"""The fused IGN step: f(f(z)) computed once, no weight copy.

f_θ(sg f_θ(z)) (tight role) and f_θ'(f_θ(z)) (idem role) have the same value, so one forward of the second
application serves both, provided its backward sends the tight role's gradient into θ and the idem role's
gradient into the input f_θ(z), never the other way round. `SharedSecondApplication` is that forward: it
returns the value twice, once per role, so autograd hands its backward the two upstream gradients g_idem and
g_tight separately.

Both are per-sample multiples of one tensor, ∂d(ffz, fz)/∂ffz: g_idem_i = α·G_i, g_tight_i = β_i·G_i with
α = λi/B and β_i = -(λt/B)·c_i, c_i the clamp's derivative (1 with the clamp off). So one vector-Jacobian
product with g_tight gives dθ for the tight role, and its input gradient, rescaled by α/β_i, is the idem
role's input gradient:
- clamp off: α/β is one constant, valid for any model (the VJP is linear), batch-coupled ones included;
- clamp on, no batch coupling: sample i's input gradient depends only on its own upstream gradient, so the
  per-sample ratio works, except where c_i underflows (a saturated tanh): β_i·G_i carries no information
  about G_i there, and those steps take the general path;
- otherwise (BatchNorm in train mode with the clamp on, or inside a CUDA graph capture, where the choice
  could not depend on the data without a host sync): two VJPs over the one saved forward.
The ratio is read off the two gradients themselves (⟨g_idem_i, g_tight_i⟩ / ‖g_tight_i‖²), so it is exact for
whatever per-sample scales the loss kernel produced.
"""
import torch

# c_i below this (relative to the clamp-free ratio) counts as underflowed: take two VJPs instead of rescaling.
MIN_RELATIVE_TIGHT_SCALE = 1e-6


class SecondApplicationPlan:
    """What the backward needs to know about the model and loss, fixed for one step."""

    def __init__(self, model, params, batch_coupled, clamp_on, lambda_idem, lambda_tight, sync_free=False):
        self.model = model
        self.sync_free = sync_free  # inside a CUDA graph capture: no data-dependent choice of path
        self.params = params
        self.batch_coupled = batch_coupled
        self.clamp_on = clamp_on
        self.lambda_idem = lambda_idem
        self.lambda_tight = lambda_tight
        self.vjp_count = 0  # backward passes through the second application, for tests and benchmarks


class SharedSecondApplication(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fz, plan, *params):
        with torch.enable_grad():
            inner_input = fz.detach().requires_grad_(True)
            inner_output = plan.model(inner_input)
        ctx.plan, ctx.inner_input, ctx.inner_output = plan, inner_input, inner_output
        value = inner_output.detach()
        return value, value.detach()  # (idem role, tight role): two outputs, so two separate gradients

    @staticmethod
    def backward(ctx, g_idem, g_tight):
        plan, u, out = ctx.plan, ctx.inner_input, ctx.inner_output
        params = plan.params
        need_input = ctx.needs_input_grad[0] and plan.lambda_idem != 0
        need_params = plan.lambda_tight != 0
        grad_input, grad_params = None, [None] * len(params)
        if need_input and need_params:
            ratio = _idem_to_tight_ratio(plan, g_idem, g_tight)
            if ratio is not None:
                plan.vjp_count += 1
                grads = torch.autograd.grad(out, [u, *params], g_tight, allow_unused=True)
                grad_input = grads[0] * ratio
                grad_params = list(grads[1:])
            else:
                plan.vjp_count += 2
                grad_input = torch.autograd.grad(out, u, g_idem, retain_graph=True)[0]
                grad_params = list(torch.autograd.grad(out, params, g_tight, allow_unused=True))
        elif need_input:
            plan.vjp_count += 1
            grad_input = torch.autograd.grad(out, u, g_idem)[0]
        elif need_params:
            plan.vjp_count += 1
            grad_params = list(torch.autograd.grad(out, params, g_tight, allow_unused=True))
        ctx.inner_input = ctx.inner_output = None
        return (grad_input, None, *grad_params)


def _idem_to_tight_ratio(plan, g_idem, g_tight):
    """The factor r (a scalar, or per sample) with g_idem = r·g_tight, or None where rescaling is invalid."""
    constant = -plan.lambda_idem / plan.lambda_tight
    if not plan.clamp_on:
        return constant
    if plan.batch_coupled or plan.sync_free:
        return None
    a = g_idem.reshape(g_idem.shape[0], -1).double()
    b = g_tight.reshape(g_tight.shape[0], -1).double()
    norm_a, norm_b = a.square().sum(1), b.square().sum(1)
    ratio = torch.where(norm_b > 0, (a * b).sum(1) / norm_b.clamp_min(1e-300), torch.zeros_like(norm_b))
    underflowed = (norm_a > 0) & (norm_b <= (MIN_RELATIVE_TIGHT_SCALE / constant) ** 2 * norm_a)
    if bool(underflowed.any()):
        return None
    return ratio.to(g_tight.dtype).view(-1, *([1] * (g_tight.dim() - 1)))


def shared_second_application(model, fz, loss, batch_coupled, sync_free=False):
    """(f_fz, ff_z): the value f_θ(f_θ(z)) computed once, in its idem role and its tight role."""
    params = tuple(p for p in model.parameters() if p.requires_grad)
    plan = SecondApplicationPlan(model, params, batch_coupled, loss.tight_clamp_ratio is not None,
                                 loss.lambda_idem, loss.lambda_tight, sync_free)
    f_fz, ff_z = SharedSecondApplication.apply(fz, plan, *params)
    return f_fz, ff_z, plan
