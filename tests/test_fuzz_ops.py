"""Property-based tests of the ops against ign_fast.reference (hypothesis).

Each op is described once by an `OpSpec`: the op, its float64 oracle, a strategy that draws valid inputs
(random shapes including batch 0 and 1, dtypes, strided / transposed / sliced / expanded layouts, values from
1e-30 to 1e30) and one that draws invalid inputs with the error they must raise. The same three tests run
for every entry of OPS: per_sample_distance, ign_loss (its four outputs folded into one per-sample tensor)
and nearest_neighbors (the nearest distance, which is unique where the index is a tie).
"""
import dataclasses
import math
import re
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ign_fast
from ign_fast import reference

pytestmark = pytest.mark.kernels  # conftest: fails where the compiled extension did not load

VALID_EXAMPLES = 300
BAD_EXAMPLES = 150
FUZZ = settings(max_examples=VALID_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)
FUZZ_BAD = settings(max_examples=BAD_EXAMPLES, deadline=None, derandomize=True)

DTYPES = (torch.float64, torch.float32, torch.bfloat16)
EPS = {torch.float64: 2.3e-16, torch.float32: 1.2e-7}


@dataclasses.dataclass
class OpSpec:
    """op(*inputs, **options) checked against oracle(*float64 inputs, **options)."""
    op: Callable
    oracle: Callable
    inputs: Callable          # draw(data) -> (tuple of tensors, options dict)
    bad_inputs: Callable      # draw(data) -> (args tuple, kwargs dict, exception type, argument name)
    tolerance: Callable       # (inputs, options, expected) -> (atol, rtol)
    differentiable: bool = True
    grad_eps_factor: float = 16   # gradient tolerance in units of the dtype's eps (a composite needs more)


# ------------------------------------------------------------------------------------------ tensor drawing

LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "channels_last")


def in_layout(values, layout):
    """The same values, laid out in memory as a view of permuted, larger or broadcast storage. "expanded"
    repeats the first slice along the first non-batch dim longer than 1 (a real stride-0 view)."""
    shape = values.shape
    if layout == "transposed" and values.dim() >= 2:
        order = list(reversed(range(values.dim())))
        return values.permute(order).contiguous().permute(order)
    if layout == "sliced":
        big = torch.zeros((2 * shape[0] + 1, *[s + 2 for s in shape[1:]]), dtype=values.dtype)
        view = big[(slice(1, None, 2), *[slice(1, 1 + s) for s in shape[1:]])]
        view.copy_(values)
        return view
    if layout == "expanded":
        long_dims = [d for d in range(1, values.dim()) if shape[d] > 1]
        if long_dims:
            return values.narrow(long_dims[0], 0, 1).expand(shape)
    if layout == "channels_last" and values.dim() == 4:
        return values.contiguous(memory_format=torch.channels_last)
    return values.contiguous()


@st.composite
def shapes(draw, min_batch=0):
    batch = draw(st.sampled_from([0, 1, 1, 2, 3, 5, 17]) if min_batch == 0 else st.integers(min_batch, 17))
    rest = draw(st.lists(st.sampled_from([1, 2, 3, 7, 13, 28]), min_size=1, max_size=3))
    return (batch, *rest)


# ------------------------------------------------------------------------------------------ per_sample_distance

@st.composite
def distance_inputs(draw):
    shape = draw(shapes())
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["l1", "l2"]))
    # l2 squares its differences: above ~1e18 they overflow float32, so its scales stop at 1e15
    scales = [1e-30, 1e-12, 1e-3, 1.0, 1e3, 1e15] + ([1e30] if kind == "l1" else [])
    scale = draw(st.sampled_from(scales))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    a = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if draw(st.booleans()):  # b near a: relative differences 1e-6..1 (cancellation), some exactly equal
        rel = 10 ** (-6 * torch.rand(shape, generator=g, dtype=torch.float64))
        equal = torch.rand(shape, generator=g) < 0.2
        b = torch.where(equal, a, a + torch.randn(shape, generator=g, dtype=torch.float64) * scale * rel)
    else:
        b = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    a = in_layout(a.to(dtype), draw(st.sampled_from(LAYOUTS)))
    b = in_layout(b.to(dtype), draw(st.sampled_from(LAYOUTS)))
    return (a, b), {"kind": kind}


def distance_tolerance(inputs, options, expected):
    a, _ = inputs
    per_row = max(1, math.prod(a.shape[1:]))
    eps = EPS[torch.float64 if a.dtype == torch.float64 else torch.float32]
    # summing n positive terms in any order: relative error <= n·eps (pairwise or blocked sums do better);
    # absolute slack for results that underflow the output dtype (e.g. squares of 1e-30 in float32)
    tiny = 1e-300 if a.dtype == torch.float64 else 1e-37
    return tiny, 4 * eps * per_row + 2 * eps


@st.composite
def bad_distance_inputs(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    shape = draw(shapes(min_batch=1))
    a = torch.randn(shape, generator=g)
    case = draw(st.sampled_from(["b_shape", "b_dtype", "a_int", "b_int", "a_scalar", "kind", "a_list",
                                 "b_none", "b_device", "empty_rows", "a_bool"]))
    if case == "b_shape":
        other = draw(shapes(min_batch=1).filter(lambda s: s != shape))
        return (a, torch.randn(other, generator=g)), {}, ValueError, "b"
    if case == "b_dtype":
        dtype = draw(st.sampled_from([torch.float64, torch.bfloat16, torch.float16]))
        return (a, a.to(dtype)), {}, TypeError, "b"
    if case == "a_int":
        return (a.to(torch.int64), a), {}, TypeError, "a"
    if case == "b_int":
        return (a, a.to(torch.int32)), {}, TypeError, "b"
    if case == "a_bool":
        return (a > 0, a > 0), {}, TypeError, "a"
    if case == "a_scalar":
        return (torch.tensor(1.0), torch.tensor(2.0)), {}, ValueError, "a"
    if case == "kind":
        kind = draw(st.text(min_size=0, max_size=4).filter(lambda k: k not in ("l1", "l2")))
        return (a, a), {"kind": kind}, ValueError, "kind"
    if case == "a_list":
        return (a.tolist(), a), {}, TypeError, "a"
    if case == "b_none":
        return (a, None), {}, TypeError, "b"
    if case == "b_device":
        return (a, torch.empty(shape, device="meta")), {}, ValueError, "b"
    if case == "empty_rows":
        zero = (shape[0], *shape[1:-1], 0)
        return (torch.zeros(zero), torch.zeros(zero)), {}, ValueError, "a"
    raise AssertionError(case)


def distance_oracle(a, b, kind="l1"):
    return reference.per_sample_distance(a, b, kind)


# ------------------------------------------------------------------------------------------ ign_loss

@st.composite
def loss_inputs(draw):
    shape = draw(shapes(min_batch=1))  # the loss needs at least one sample
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["l1", "l2"]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    ratio = draw(st.sampled_from([None, 1.5, 1e-3]))  # off, the paper's, and one that saturates tanh
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    x, fx, fz, ffz = (torch.randn(shape, generator=g, dtype=torch.float64) * scale for _ in range(4))
    if draw(st.booleans()):
        fx = x.clone()  # rec_i = 0 exactly: the clamp's limit
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(4)]
    x, fx, fz, ffz = (in_layout(t.to(dtype), layout) for t, layout in zip((x, fx, fz, ffz), layouts))
    ff_z = ffz if draw(st.booleans()) else ffz.clone()  # one tensor in both roles, or two equal ones
    options = {"kind": kind, "lambda_rec": draw(st.sampled_from([0.0, 20.0])), "lambda_idem": 20.0,
               "lambda_tight": draw(st.sampled_from([0.0, 2.5])), "tight_clamp_ratio": ratio}
    return (x, fx, fz, ffz, ff_z), options


def loss_per_sample(out):
    # total, rec, idem, tight folded into one [B] tensor, so the shared properties apply unchanged
    total, rec, idem, tight = out
    return total + rec + idem + tight


def loss_op(x, fx, fz, f_fz, ff_z, **options):
    return loss_per_sample(ign_fast.ign_loss(x, fx, fz, f_fz, ff_z, **options))


def loss_oracle(x, fx, fz, f_fz, ff_z, **options):
    return loss_per_sample(reference.ign_loss(x, fx, fz, f_fz, ff_z, **options))


def loss_tolerance(inputs, options, expected):
    x = inputs[0]
    per_row = max(1, math.prod(x.shape[1:]))
    eps = EPS[torch.float64 if x.dtype == torch.float64 else torch.float32]
    terms = reference.ign_loss(*(t.double() for t in inputs), **options)
    scale = max(float(t.abs().max()) for t in terms)
    # each term is a per-row mean (n·eps), the clamp's tanh at most doubles it, total sums B of them
    rtol = 8 * eps * per_row + 8 * eps
    return rtol * scale + 1e-300, rtol


@st.composite
def bad_loss_inputs(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    shape = draw(shapes(min_batch=1))
    x = torch.randn(shape, generator=g)
    good = [x, x + 1, x - 1, x * 2, x * 2]
    case = draw(st.sampled_from(["fx_shape", "ff_z_dtype", "kind", "lambda", "ratio", "empty", "x_int", "f_fz_none"]))
    if case == "fx_shape":
        other = draw(shapes(min_batch=1).filter(lambda s: s != shape))
        return (x, torch.randn(other, generator=g), *good[2:]), {}, ValueError, "fx"
    if case == "ff_z_dtype":
        return (*good[:4], good[4].double()), {}, TypeError, "ff_z"
    if case == "kind":
        return tuple(good), {"kind": "cos"}, ValueError, "kind"
    if case == "lambda":
        return tuple(good), {"lambda_idem": -1.0}, ValueError, "lambda_idem"
    if case == "ratio":
        return tuple(good), {"tight_clamp_ratio": 0.0}, ValueError, "tight_clamp_ratio"
    if case == "empty":
        empty = torch.zeros((0, *shape[1:]))
        return (empty,) * 5, {}, ValueError, "x"
    if case == "x_int":
        return (x.to(torch.int64), *good[1:]), {}, TypeError, "x"
    if case == "f_fz_none":
        return (*good[:3], None, good[4]), {}, TypeError, "f_fz"
    raise AssertionError(case)


# ------------------------------------------------------------------------------------------ nearest_neighbors

@st.composite
def neighbor_inputs(draw):
    batch = draw(st.sampled_from([0, 1, 3, 17]))
    count = draw(st.sampled_from([1, 2, 5, 33, 300]))
    rest = draw(st.lists(st.sampled_from([1, 3, 7, 28]), min_size=1, max_size=2))
    dtype = draw(st.sampled_from(DTYPES))
    metric = draw(st.sampled_from(["l1", "l2"]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    candidates = torch.randn((count, *rest), generator=g, dtype=torch.float64) * scale
    if draw(st.booleans()) and batch > 0:  # queries copied from candidates: exact minima of 0, ties
        queries = candidates[torch.randint(0, count, (batch,), generator=g)].clone()
    else:
        queries = torch.randn((batch, *rest), generator=g, dtype=torch.float64) * scale
    queries = in_layout(queries.to(dtype), draw(st.sampled_from(LAYOUTS)))
    candidates = in_layout(candidates.to(dtype), draw(st.sampled_from(LAYOUTS)))
    return (queries, candidates), {"metric": metric}


def neighbor_distance(queries, candidates, metric="l2"):
    # the distance to the nearest candidate: unique even where the index is a tie
    return ign_fast.nearest_neighbors(queries, candidates, metric)[1]


def neighbor_oracle(queries, candidates, metric="l2"):
    return reference.nearest_neighbors(queries, candidates, metric)[1]


def neighbor_tolerance(inputs, options, expected):
    q = inputs[0]
    per_row = max(1, math.prod(q.shape[1:]))
    eps = EPS[torch.float64 if q.dtype == torch.float64 else torch.float32]
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return 4 * eps * per_row * scale + 1e-300, 4 * eps * per_row + 2 * eps


@st.composite
def bad_neighbor_inputs(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    q = torch.randn((3, 7), generator=g)
    c = torch.randn((5, 7), generator=g)
    case = draw(st.sampled_from(["width", "dtype", "metric", "empty", "q_int", "c_list"]))
    if case == "width":
        return (q, torch.randn((5, draw(st.sampled_from([1, 6, 8]))), generator=g)), {}, ValueError, "candidates"
    if case == "dtype":
        return (q, c.double()), {}, TypeError, "candidates"
    if case == "metric":
        return (q, c), {"metric": "cosine"}, ValueError, "metric"
    if case == "empty":
        return (q, c[:0]), {}, ValueError, "candidates"
    if case == "q_int":
        return (q.to(torch.int32), c), {}, TypeError, "queries"
    if case == "c_list":
        return (q, c.tolist()), {}, TypeError, "candidates"
    raise AssertionError(case)


OPS = {
    "per_sample_distance": OpSpec(op=ign_fast.per_sample_distance, oracle=distance_oracle, inputs=distance_inputs,
                                  bad_inputs=bad_distance_inputs, tolerance=distance_tolerance),
    # ign_loss gradients pass through λ/B scales and the clamp's tanh and sech² (a dozen roundings)
    "ign_loss": OpSpec(op=loss_op, oracle=loss_oracle, inputs=loss_inputs, bad_inputs=bad_loss_inputs,
                       tolerance=loss_tolerance, grad_eps_factor=256),
    "nearest_neighbors": OpSpec(op=neighbor_distance, oracle=neighbor_oracle, inputs=neighbor_inputs,
                                bad_inputs=bad_neighbor_inputs, tolerance=neighbor_tolerance, differentiable=False),
}


# ------------------------------------------------------------------------------------------ the properties

def assert_matches_oracle(spec, inputs, options):
    out = spec.op(*inputs, **options)
    expected = spec.oracle(*(t.double() for t in inputs), **options)
    assert out.shape == expected.shape
    atol, rtol = spec.tolerance(inputs, options, expected)
    # the oracle rounded to the op's output dtype: where the exact value is beyond that dtype's range the
    # op must return inf too (equal_nan=False: a NaN anywhere fails)
    torch.testing.assert_close(out.double(), expected.to(out.dtype).double(), atol=atol, rtol=rtol, equal_nan=False)
    return out


@pytest.mark.parametrize("name", list(OPS))
@FUZZ
@given(data=st.data())
def test_matches_reference(name, data):
    spec = OPS[name]
    inputs, options = data.draw(spec.inputs())
    out = assert_matches_oracle(spec, inputs, options)
    # the op's result does not depend on memory layout: the same values, contiguous, give the same output
    again = spec.op(*(t.contiguous() for t in inputs), **options)
    torch.testing.assert_close(out, again, atol=spec.tolerance(inputs, options, out)[0], rtol=1e-6)


@pytest.mark.parametrize("name", [n for n, s in OPS.items() if s.differentiable])
@settings(max_examples=VALID_EXAMPLES // 3, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(data=st.data())
def test_gradients_match_reference(name, data):
    spec = OPS[name]
    inputs, options = data.draw(spec.inputs())
    if inputs[0].dtype == torch.bfloat16 or inputs[0].shape[0] == 0:
        return  # bf16 gradients are checked in the op's own tests; an empty batch has none
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    weights = torch.randn(inputs[0].shape[0], dtype=torch.float64)
    (spec.op(*leaves, **options).double() * weights).sum().backward()
    got = [t.grad for t in leaves]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    (spec.oracle(*ref_leaves, **options) * weights).sum().backward()
    for g, r in zip(got, ref_leaves):
        scale = r.grad.abs().max().item() if r.grad.numel() else 0.0
        eps = EPS[inputs[0].dtype]
        k = spec.grad_eps_factor
        torch.testing.assert_close(g.double(), r.grad, atol=k * eps * scale + 1e-300, rtol=k * eps)


@pytest.mark.parametrize("name", list(OPS))
@FUZZ_BAD
@given(data=st.data())
def test_bad_inputs_raise_one_line_naming_the_argument(name, data):
    spec = OPS[name]
    args, kwargs, error, argument = data.draw(spec.bad_inputs())
    with pytest.raises(error) as info:
        spec.op(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and re.match(rf"{re.escape(argument)}\b", message), message
