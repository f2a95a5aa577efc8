"""Triton kernels of ign_fast.ign_loss (the op, its contract and the math live in ign_fast/ops.py and
ign_fast/reference.py; the C++ twin is csrc/ign_loss.h).

Forward, two launches: one program per (row, chunk) reads the chunk of all five inputs once (four when f_fz
and ff_z are one tensor) and writes the three partial sums; then one program adds each row's partials in a
fixed order (deterministic), applies the clamp, writes rec, idem, tight, tight before the clamp, and the total.
Backward, one launch: each (row, chunk) program derives its row's gradient scales from the saved rec_i and
t_i and the upstream gradients, then writes every gradient of its chunk. Inputs arrive contiguous.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import acc_dtype, distance_derivative, distance_term, launch_plan, on_device

# ign_fast.reference.CLAMP_SCALE_EPS and CLAMP_ARG_LIMIT
CLAMP_SCALE_EPS = 1e-12
CLAMP_ARG_LIMIT = 20.0
FINALIZE_ROWS = 256


# Taylor coefficients of tanh(v)/v in powers of v^2, through v^14. On |v| < 1/8 the first omitted term
# (0.00059·v^16) is below 2.1e-18 relative: exact to float64, not only to float32.
_T3 = tl.constexpr(-1.0 / 3.0)
_T5 = tl.constexpr(2.0 / 15.0)
_T7 = tl.constexpr(-17.0 / 315.0)
_T9 = tl.constexpr(62.0 / 2835.0)
_T11 = tl.constexpr(-1382.0 / 155925.0)
_T13 = tl.constexpr(21844.0 / 6081075.0)
_T15 = tl.constexpr(-929569.0 / 638512875.0)


@triton.jit
def _tanh(v):
    # tl has no tanh that both the GPU and the interpreter know (libdevice is GPU-only). Away from 0,
    # (1 - e)/(1 + e) with e = exp(-2|v|) loses at most a few ulp (1 - e >= 0.22 there; tl.exp is libdevice's
    # __nv_exp, within 1 ulp, in float64, ex2.approx in float32). Near 0 that form cancels (~ulp/|v|), so
    # use the series there. Python-float constants meet a float64 operand as float64 (triton's
    # binary_op_type_checking_impl builds them at the operand's type), so nothing here rounds to float32.
    a = tl.abs(v)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    v2 = a * a
    near = a * (1.0 + v2 * (_T3 + v2 * (_T5 + v2 * (_T7 + v2 * (_T9 + v2 * (_T11 + v2 * (_T13 + v2 * _T15)))))))
    r = tl.where(a < 0.125, near, far)
    return tl.where(v < 0, -r, r)


@triton.jit
def _scalars(lambda_rec, lambda_idem, lambda_tight, ratio, ACC: tl.constexpr):
    # The float arguments are annotated tl.float64: unannotated, a compiled kernel takes a Python float as
    # float32, and λ and the clamp ratio of a float64 loss would be rounded to 7 digits. They are brought
    # to the accumulation type here, so a float32 loss still computes in float32. (The interpreter passes
    # Python floats through unconverted; tl.full builds the same ACC value from either.)
    return (tl.full([], lambda_rec, ACC), tl.full([], lambda_idem, ACC), tl.full([], lambda_tight, ACC),
            tl.full([], ratio, ACC))


@triton.jit
def _clamp_tight(t, rec, ratio, EPS: tl.constexpr, LIMIT: tl.constexpr):
    """tight after the clamp and its derivatives in t and rec; see clamp_tight in csrc/ign_loss.h."""
    scale = ratio * rec
    usable = scale > EPS
    safe = tl.where(usable, scale, 1.0)
    u = t / safe
    inside = (u >= -LIMIT) & (u <= LIMIT)
    th = _tanh(tl.minimum(tl.maximum(u, -LIMIT), LIMIT))
    sech2 = tl.where(inside, 1.0 - th * th, 0.0)
    sg = (t > 0).to(t.dtype) - (t < 0).to(t.dtype)
    value = tl.where(usable, th * safe, sg * scale)
    d_t = tl.where(usable, sech2, 0.0)
    d_rec = ratio * tl.where(usable, th - sech2 * u, sg)
    return value, d_t, d_rec


@triton.jit
def _partials_kernel(x_ptr, fx_ptr, fz_ptr, fi_ptr, ft_ptr, part_ptr, n, batch_x, batch_z, rows, chunks,
                     L1: tl.constexpr, ALIASED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                     ACC: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = row.to(tl.int64) * n
    has_x = row < batch_x
    has_z = row < batch_z
    offs = tl.arange(0, BLOCK)
    acc_rec = tl.zeros([BLOCK], ACC)
    acc_idem = tl.zeros([BLOCK], ACC)
    acc_tight = tl.zeros([BLOCK], ACC)
    for start in range(0, CHUNK, BLOCK):
        idx = chunk * CHUNK + start + offs
        inside = idx < n
        mx = inside & has_x
        mz = inside & has_z
        a = tl.load(fx_ptr + base + idx, mask=mx, other=0.0).to(ACC)
        b = tl.load(x_ptr + base + idx, mask=mx, other=0.0).to(ACC)
        acc_rec += distance_term(a - b, L1)
        c = tl.load(fz_ptr + base + idx, mask=mz, other=0.0).to(ACC)
        p = tl.load(fi_ptr + base + idx, mask=mz, other=0.0).to(ACC)
        acc_idem += distance_term(p - c, L1)
        if not ALIASED:
            q = tl.load(ft_ptr + base + idx, mask=mz, other=0.0).to(ACC)
            acc_tight += distance_term(q - c, L1)
    slot = row * chunks + chunk
    plane = rows * chunks
    s_idem = tl.sum(acc_idem, axis=0)
    tl.store(part_ptr + slot, tl.sum(acc_rec, axis=0))
    tl.store(part_ptr + plane + slot, s_idem)
    if ALIASED:
        tl.store(part_ptr + 2 * plane + slot, s_idem)
    else:
        tl.store(part_ptr + 2 * plane + slot, tl.sum(acc_tight, axis=0))


@triton.jit
def _finalize_kernel(part_ptr, total_ptr, rec_ptr, idem_ptr, tight_ptr, raw_ptr, n, batch_x, batch_z, rows, chunks,
                     lambda_rec: tl.float64, lambda_idem: tl.float64, lambda_tight: tl.float64, ratio: tl.float64,
                     HAS_CLAMP: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr,
                     LIMIT: tl.constexpr):
    lambda_rec, lambda_idem, lambda_tight, ratio = _scalars(lambda_rec, lambda_idem, lambda_tight, ratio, ACC)
    offs = tl.arange(0, BLOCK_R)
    plane = rows * chunks
    sum_rec = tl.zeros([BLOCK_R], ACC)
    sum_idem = tl.zeros([BLOCK_R], ACC)
    sum_tight = tl.zeros([BLOCK_R], ACC)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + offs
        valid = r < rows
        s_rec = tl.zeros([BLOCK_R], ACC)
        s_idem = tl.zeros([BLOCK_R], ACC)
        s_tight = tl.zeros([BLOCK_R], ACC)
        for c in range(0, chunks):
            s_rec += tl.load(part_ptr + r * chunks + c, mask=valid, other=0.0)
            s_idem += tl.load(part_ptr + plane + r * chunks + c, mask=valid, other=0.0)
            s_tight += tl.load(part_ptr + 2 * plane + r * chunks + c, mask=valid, other=0.0)
        rec = s_rec / n
        idem = s_idem / n
        t = -s_tight / n
        if HAS_CLAMP:
            tight, _, _ = _clamp_tight(t, rec, ratio, EPS, LIMIT)
        else:
            tight = t
        mx = r < batch_x
        mz = r < batch_z
        tl.store(rec_ptr + r, rec, mask=mx)
        tl.store(idem_ptr + r, idem, mask=mz)
        tl.store(tight_ptr + r, tight, mask=mz)
        tl.store(raw_ptr + r, t, mask=mz)
        sum_rec += tl.where(mx, rec, 0.0)
        sum_idem += tl.where(mz, idem, 0.0)
        sum_tight += tl.where(mz, tight, 0.0)
    total = (lambda_rec * (tl.sum(sum_rec, axis=0) / batch_x) + lambda_idem * (tl.sum(sum_idem, axis=0) / batch_z)
             + lambda_tight * (tl.sum(sum_tight, axis=0) / batch_z))
    tl.store(total_ptr, total)


@triton.jit
def _backward_kernel(x_ptr, fx_ptr, fz_ptr, fi_ptr, ft_ptr, gx_ptr, gfx_ptr, gfz_ptr, gi_ptr, gt_ptr,
                     g_total_ptr, g_rec_ptr, g_idem_ptr, g_tight_ptr, rec_ptr, raw_ptr, n, batch_x, batch_z,
                     lambda_rec: tl.float64, lambda_idem: tl.float64, lambda_tight: tl.float64, ratio: tl.float64,
                     L1: tl.constexpr, ALIASED: tl.constexpr,
                     HAS_CLAMP: tl.constexpr, HAS_ROW_GRADS: tl.constexpr, WRITE_X: tl.constexpr,
                     CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr,
                     LIMIT: tl.constexpr):
    lambda_rec, lambda_idem, lambda_tight, ratio = _scalars(lambda_rec, lambda_idem, lambda_tight, ratio, ACC)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = row.to(tl.int64) * n
    has_x = row < batch_x
    has_z = row < batch_z
    # in-range indices for the per-row loads of a row that lacks x or z (its elements are masked off anyway)
    rx = tl.minimum(row, batch_x - 1)
    rz = tl.minimum(row, batch_z - 1)
    g_total = tl.load(g_total_ptr).to(ACC)
    c_rec = g_total * lambda_rec / batch_x
    c_idem = g_total * lambda_idem / batch_z
    g_tight_out = g_total * lambda_tight / batch_z
    if HAS_ROW_GRADS:
        c_rec += tl.load(g_rec_ptr + rx).to(ACC)
        c_idem += tl.load(g_idem_ptr + rz).to(ACC)
        g_tight_out += tl.load(g_tight_ptr + rz).to(ACC)
    if HAS_CLAMP:
        _, d_t, d_rec = _clamp_tight(tl.load(raw_ptr + rz).to(ACC), tl.load(rec_ptr + rx).to(ACC), ratio, EPS, LIMIT)
        c_tight = g_tight_out * d_t
        c_rec += g_tight_out * d_rec
    else:
        c_tight = g_tight_out
    c_rec = c_rec / n
    c_idem = c_idem / n
    c_tight = -c_tight / n
    offs = tl.arange(0, BLOCK)
    for start in range(0, CHUNK, BLOCK):
        idx = chunk * CHUNK + start + offs
        inside = idx < n
        mx = inside & has_x
        mz = inside & has_z
        a = tl.load(fx_ptr + base + idx, mask=mx, other=0.0).to(ACC)
        b = tl.load(x_ptr + base + idx, mask=mx, other=0.0).to(ACC)
        g = c_rec * distance_derivative(a - b, L1)
        tl.store(gfx_ptr + base + idx, g.to(gfx_ptr.dtype.element_ty), mask=mx)
        if WRITE_X:
            tl.store(gx_ptr + base + idx, (-g).to(gx_ptr.dtype.element_ty), mask=mx)
        c = tl.load(fz_ptr + base + idx, mask=mz, other=0.0).to(ACC)
        p = tl.load(fi_ptr + base + idx, mask=mz, other=0.0).to(ACC)
        dp = distance_derivative(p - c, L1)
        gi = c_idem * dp
        tl.store(gi_ptr + base + idx, gi.to(gi_ptr.dtype.element_ty), mask=mz)
        tl.store(gfz_ptr + base + idx, (-gi).to(gfz_ptr.dtype.element_ty), mask=mz)
        if ALIASED:
            dq = dp
        else:
            q = tl.load(ft_ptr + base + idx, mask=mz, other=0.0).to(ACC)
            dq = distance_derivative(q - c, L1)
        tl.store(gt_ptr + base + idx, (c_tight * dq).to(gt_ptr.dtype.element_ty), mask=mz)


def same_tensor(a, b):
    """f_fz and ff_z are one tensor (a fused step passes t and t.detach()): read it once."""
    try:
        return a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.shape == b.shape
    except RuntimeError:  # tensors without storage (torch.compile tracing): read both, still correct
        return False


def forward(x, fx, fz, f_fz, ff_z, kind, lambda_rec, lambda_idem, lambda_tight, tight_clamp_ratio):
    """(total, rec, idem, tight, tight_unclamped) of contiguous inputs; see ign_fast.ops.ign_loss."""
    batch_x, batch_z = x.shape[0], fz.shape[0]
    rows = max(batch_x, batch_z)
    n = x.numel() // batch_x
    aliased = same_tensor(f_fz, ff_z)
    chunk, block, chunks = launch_plan(n)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    partials = torch.empty((3, rows, chunks), device=x.device, dtype=acc)
    total = torch.empty((), device=x.device, dtype=acc)
    rec = torch.empty((batch_x,), device=x.device, dtype=acc)
    idem, tight, raw = (torch.empty((batch_z,), device=x.device, dtype=acc) for _ in range(3))
    has_clamp = tight_clamp_ratio is not None
    with on_device(x):
        wrap_triton(_partials_kernel)[(rows, chunks)](
            x, fx, fz, f_fz, ff_z, partials, n, batch_x, batch_z, rows, chunks, L1=kind == "l1", ALIASED=aliased,
            CHUNK=chunk, BLOCK=block, ACC=acc_dtype(x.dtype))
        wrap_triton(_finalize_kernel)[(1,)](
            partials, total, rec, idem, tight, raw, n, batch_x, batch_z, rows, chunks, float(lambda_rec),
            float(lambda_idem), float(lambda_tight), float(tight_clamp_ratio) if has_clamp else 1.0,
            HAS_CLAMP=has_clamp, BLOCK_R=min(FINALIZE_ROWS, triton.next_power_of_2(rows)), ACC=acc_dtype(x.dtype),
            EPS=CLAMP_SCALE_EPS, LIMIT=CLAMP_ARG_LIMIT)
    return total, rec, idem, tight, raw


def backward(grad_total, grad_rec, grad_idem, grad_tight, x, fx, fz, f_fz, ff_z, rec, tight_unclamped, kind,
             lambda_rec, lambda_idem, lambda_tight, tight_clamp_ratio, compute_grad_x):
    """(grad_x or an empty [0] tensor, grad_fx, grad_fz, grad_f_fz, grad_ff_z); see ign_fast.ops.ign_loss."""
    batch_x, batch_z = x.shape[0], fz.shape[0]
    rows = max(batch_x, batch_z)
    n = x.numel() // batch_x
    aliased = same_tensor(f_fz, ff_z)
    chunk, block, chunks = launch_plan(n)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    has_row_grads = not (grad_rec is None and grad_idem is None and grad_tight is None)
    if has_row_grads:  # a missing one is zeros: only the present ones carry gradient
        grad_rec = torch.zeros(batch_x, device=x.device, dtype=acc) if grad_rec is None else grad_rec.contiguous()
        grad_idem = torch.zeros(batch_z, device=x.device, dtype=acc) if grad_idem is None else grad_idem.contiguous()
        grad_tight = (torch.zeros(batch_z, device=x.device, dtype=acc) if grad_tight is None
                      else grad_tight.contiguous())
    else:  # never read (HAS_ROW_GRADS=False), any pointer will do
        grad_rec = grad_idem = grad_tight = rec
    grad_x = torch.empty_like(x) if compute_grad_x else x.new_empty((0,))
    grad_fx = torch.empty_like(x)
    grad_fz, grad_f_fz, grad_ff_z = (torch.empty_like(fz) for _ in range(3))
    has_clamp = tight_clamp_ratio is not None
    g_total = grad_total.to(acc).contiguous()
    rec, tight_unclamped = rec.contiguous(), tight_unclamped.contiguous()
    with on_device(x):
        wrap_triton(_backward_kernel)[(rows, chunks)](
            x, fx, fz, f_fz, ff_z, grad_x if compute_grad_x else grad_fx, grad_fx, grad_fz, grad_f_fz, grad_ff_z,
            g_total, grad_rec, grad_idem, grad_tight, rec, tight_unclamped, n, batch_x, batch_z, float(lambda_rec),
            float(lambda_idem), float(lambda_tight), float(tight_clamp_ratio) if has_clamp else 1.0,
            L1=kind == "l1", ALIASED=aliased, HAS_CLAMP=has_clamp, HAS_ROW_GRADS=has_row_grads,
            WRITE_X=compute_grad_x, CHUNK=chunk, BLOCK=block, ACC=acc_dtype(x.dtype), EPS=CLAMP_SCALE_EPS,
            LIMIT=CLAMP_ARG_LIMIT)
    return grad_x, grad_fx, grad_fz, grad_f_fz, grad_ff_z
