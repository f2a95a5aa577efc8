"""ign_fast.nearest_neighbors (the IMLE search) against a direct-difference float64 search (torch.cdist +
argmin), on every backend present: the compiled CPU / CUDA kernels, the Triton kernel under TRITON_INTERPRET=1
(in a subprocess: the variable must be set before triton is imported) and the torch reference."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.library import opcheck

import ign_fast
from ign_fast import reference
from ign_fast._extension import HAS_C

from conftest import assert_native, devices, requires_cuda, requires_ext

pytestmark = pytest.mark.kernels

# Relative distance gap under which two candidates count as a near tie for float32 / bf16 arithmetic: there
# the returned index may be either, and only its distance is checked.
NEAR_TIE = 1e-5


def cdist_search(q, c, metric):
    """float64 distances from direct differences ([B, M] is fine at test sizes), as the op defines them."""
    q64 = q.reshape(q.shape[0], -1).double()
    c64 = c.reshape(c.shape[0], -1).double()
    width = q64.shape[1]
    if metric == "l1":
        return torch.cdist(q64, c64, p=1) / width
    # direct differences (no |q|^2 + |c|^2 - 2 q.c); the square root and square add ~1e-16 relative
    return torch.cdist(q64, c64, p=2, compute_mode="donot_use_mm_for_euclid_dist") ** 2 / width


def exact_search_small(q, c, metric):
    """Distances summed exactly for small-integer inputs (float64 sums of integers), [B, M]."""
    diff = q.double()[:, None, :] - c.double()[None, :, :]
    return (diff.abs() if metric == "l1" else diff ** 2).sum(dim=2)


def assert_nearest(q, c, metric, index, distance, exact):
    """index is the first argmin of the float64 distances; with exact=False (rounded arithmetic), wherever
    the best two candidates are within NEAR_TIE of each other, the chosen one must still be within it."""
    dist = cdist_search(q, c, metric)
    best, best_idx = dist.min(dim=1)
    assert index.dtype == torch.int64 and index.shape == (q.shape[0],)
    chosen = dist.gather(1, index.cpu()[:, None].to(dist.device))[:, 0]
    if exact:
        assert torch.equal(index.cpu(), best_idx.cpu())
        torch.testing.assert_close(distance.double(), best, atol=1e-12, rtol=1e-12)
        return
    tol = NEAR_TIE * best.clamp_min(1e-30)
    assert bool((chosen <= best + tol).all()), "returned a candidate that is not (near) nearest"
    second = dist.clone()
    second.scatter_(1, best_idx[:, None], float("inf"))
    clear = (second.min(dim=1).values - best) > tol if dist.shape[1] > 1 else torch.ones_like(best, dtype=torch.bool)
    assert torch.equal(index.cpu()[clear.cpu()], best_idx.cpu()[clear.cpu()])
    torch.testing.assert_close(distance.double(), chosen, atol=1e-6, rtol=1e-5)
    return clear


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("metric", ["l1", "l2"])
@pytest.mark.parametrize("batch", [1, 3, 257])
@pytest.mark.parametrize("count", [1, 5, 1000])
@pytest.mark.parametrize("width", [1, 7, 784])
def test_matches_cdist_argmin(device, metric, batch, count, width):
    q = torch.randn(batch, width, device=device, dtype=torch.float64)
    c = torch.randn(count, width, device=device, dtype=torch.float64)
    assert_native(q)
    index, distance = ign_fast.nearest_neighbors(q, c, metric)
    assert distance.dtype == torch.float64
    assert_nearest(q, c, metric, index, distance, exact=True)
    q32, c32 = q.float(), c.float()
    index, distance = ign_fast.nearest_neighbors(q32, c32, metric)
    assert distance.dtype == torch.float32
    clear = assert_nearest(q32, c32, metric, index, distance, exact=False)
    if width > 1:  # random rows are rarely near ties: the index check above covered nearly every row
        assert clear.float().mean() > 0.95


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("metric", ["l1", "l2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_ties_go_to_the_lowest_index(device, metric, dtype):
    # Small integers: every distance is exact in every dtype, so ties are real ties and there are many.
    q = torch.randint(-2, 3, (61, 7), device=device).to(dtype)
    c = torch.randint(-2, 3, (300, 7), device=device).to(dtype)
    index, distance = ign_fast.nearest_neighbors(q, c, metric)
    dist = exact_search_small(q, c, metric)
    expected = torch.tensor([int(torch.nonzero(row == row.min())[0]) for row in dist.cpu()])
    assert torch.equal(index.cpu(), expected)
    assert torch.equal(distance.cpu(), reference.nearest_neighbors(q, c, metric)[1].cpu())
    tied_rows = ((dist == dist.min(dim=1, keepdim=True).values).sum(dim=1) > 1).sum()
    assert tied_rows >= 10  # the case has ties to break

    # Duplicates: queries equal to candidates repeated three times, at shuffled positions.
    base = torch.randn(9, 33, device=device).to(dtype)
    candidates = torch.cat([base, base, base])[torch.randperm(27, device=device)]
    index, distance = ign_fast.nearest_neighbors(base, candidates, metric)
    for i in range(9):
        copies = torch.nonzero((candidates == base[i]).all(dim=1))[:, 0]
        assert int(index[i]) == int(copies.min())
    assert bool((distance == 0).all())

    # Different rows at equal distance: +x and -x around a zero query, and all-identical candidates.
    x = torch.randn(1, 20, device=device).to(dtype)
    zeros = torch.zeros(4, 20, device=device, dtype=dtype)
    index, _ = ign_fast.nearest_neighbors(zeros, torch.cat([2 * x, -x, x, -2 * x]), metric)
    assert index.tolist() == [1] * 4
    index, _ = ign_fast.nearest_neighbors(torch.randn(5, 20, device=device).to(dtype), x.expand(6, 20), metric)
    assert index.tolist() == [0] * 5


@pytest.mark.parametrize("device", devices())
def test_l2_near_ties_under_cancellation(device):
    # A large common offset: |q|^2 + |c|^2 - 2 q.c cancels catastrophically in float32, so a GEMM alone
    # mis-orders candidates; the screen must fall back to direct differences and agree with float64.
    q = 300 + 0.01 * torch.randn(64, 100, device=device)
    c = 300 + 0.01 * torch.randn(500, 100, device=device)
    expansion = ((q * q).sum(1, keepdim=True) + (c * c).sum(1) - 2 * q @ c.t()).argmin(dim=1)
    best_idx = cdist_search(q, c, "l2").argmin(dim=1)
    assert not torch.equal(expansion.cpu(), best_idx.cpu()), "the case no longer exercises cancellation"
    index, distance = ign_fast.nearest_neighbors(q, c, "l2")
    assert_nearest(q, c, "l2", index, distance, exact=False)


@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_many_tiles_and_splits(metric):
    # More candidates than one l2 GEMM tile and many l1 splits, B not a multiple of any block.
    q = torch.randn(301, 64)
    c = torch.randn(5003, 64)
    index, distance = ign_fast.nearest_neighbors(q, c, metric)
    assert_nearest(q, c, metric, index, distance, exact=False)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_low_precision_inputs(device, metric):
    for dtype in (torch.bfloat16, torch.float16):
        q = torch.randn(37, 3, 5, 5, device=device).to(dtype)
        c = torch.randn(411, 75, device=device).to(dtype)
        index, distance = ign_fast.nearest_neighbors(q, c, metric)
        assert distance.dtype == torch.float32
        # the returned distance is the reference distance of the returned pair (accumulated in float32) ...
        pair = reference.per_sample_distance(q.flatten(1), c[index], metric)
        torch.testing.assert_close(distance, pair, atol=1e-6, rtol=1e-5)
        # ... and that pair is (near) nearest by the exact distances of the rounded inputs
        assert_nearest(q, c, metric, index, distance, exact=False)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_distance_agrees_with_per_sample_distance(device, metric):
    # The search and the IMLE loss use one definition of distance; on CPU the same summation order too.
    q = torch.randn(19, 1, 28, 28, device=device)
    c = torch.randn(333, 1, 28, 28, device=device)
    index, distance = ign_fast.nearest_neighbors(q, c, metric)
    pair = ign_fast.per_sample_distance(q, c[index], metric)
    if device == "cpu" and HAS_C:
        assert torch.equal(distance, pair)
    else:
        torch.testing.assert_close(distance, pair, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_noncontiguous_and_channels_last(device, metric):
    base_q = torch.randn(8, 3, 6, 10, device=device)
    base_c = torch.randn(50, 3, 6, 10, device=device)
    expected = ign_fast.nearest_neighbors(base_q.contiguous(), base_c.contiguous(), metric)
    for q, c in [(base_q.to(memory_format=torch.channels_last), base_c.to(memory_format=torch.channels_last)),
                 (base_q.transpose(2, 3).contiguous().transpose(2, 3), base_c)]:
        got = ign_fast.nearest_neighbors(q, c, metric)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    q, c = base_q[::2, :, ::2], base_c[::3, :, ::2]  # strided views
    assert not q.is_contiguous() and not c.is_contiguous()
    index, distance = ign_fast.nearest_neighbors(q, c, metric)
    assert_nearest(q, c, metric, index, distance, exact=False)


@pytest.mark.parametrize("device", devices())
def test_nan_never_wins_and_empty_batch(device):
    q = torch.randn(3, 4, device=device)
    c = torch.randn(6, 4, device=device)
    c[2] = float("nan")
    q[1] = float("nan")
    for metric in ("l1", "l2"):
        index, distance = ign_fast.nearest_neighbors(q, c, metric)
        assert int(index[1]) == 0 and distance[1].item() == float("inf")  # all NaN: first index, +inf
        assert bool((index != 2).all())
        ref = reference.nearest_neighbors(q, c, metric)
        assert torch.equal(index, ref[0])
        index, distance = ign_fast.nearest_neighbors(torch.empty(0, 4, device=device), c, metric)
        assert index.shape == (0,) and distance.shape == (0,) and index.dtype == torch.int64


def test_torch_backend_is_the_reference():
    q, c = torch.randn(10, 12), torch.randn(40, 12)
    try:
        ign_fast.set_backend("torch")
        got = ign_fast.nearest_neighbors(q, c, "l1")
    finally:
        ign_fast.set_backend("auto")
    ref = reference.nearest_neighbors(q, c, "l1")
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    native = ign_fast.nearest_neighbors(q, c, "l1")
    assert torch.equal(native[0], ref[0])


@pytest.mark.parametrize("bad, error, message", [
    (lambda: ign_fast.nearest_neighbors(torch.randn(2, 3), torch.randn(4, 5)), ValueError, "D = 3"),
    (lambda: ign_fast.nearest_neighbors(torch.randn(2, 3), torch.randn(4, 3).double()), TypeError, "dtype"),
    (lambda: ign_fast.nearest_neighbors(torch.randn(2, 3), torch.randn(4, 3), "cosine"), ValueError, "metric"),
    (lambda: ign_fast.nearest_neighbors(torch.randn(2, 3), torch.randn(0, 3)), ValueError, "at least one row"),
    (lambda: ign_fast.nearest_neighbors(torch.randn(2, 0), torch.randn(3, 0)), ValueError, "at least one element"),
    (lambda: ign_fast.nearest_neighbors(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64)),
     TypeError, "float"),
    (lambda: ign_fast.nearest_neighbors(torch.tensor(1.0), torch.randn(3)), ValueError, "at least 1 dims"),
    (lambda: ign_fast.nearest_neighbors([1.0], torch.randn(3)), TypeError, "torch.Tensor"),
])
def test_bad_input_is_one_clear_line(bad, error, message):
    with pytest.raises(error, match=message) as info:
        bad()
    assert "\n" not in str(info.value)


@requires_ext
@pytest.mark.parametrize("bad_call, message", [
    (lambda op: op(torch.randn(2, 3), torch.randn(4, 5), "l1"), "row length D = 3"),
    (lambda op: op(torch.randn(2, 3), torch.randn(4, 3), "l3"), "metric must be"),
    (lambda op: op(torch.randn(2, 3, 1), torch.randn(4, 3), "l1"), "queries must be 2-D"),
    (lambda op: op(torch.randn(2, 3), torch.randn(4, 3, 1), "l1"), "candidates must be 2-D"),
    (lambda op: op(torch.randn(2, 3), torch.randn(0, 3), "l1"), "at least one row"),
    (lambda op: op(torch.randn(2, 3), torch.randn(4, 3).half(), "l2"), "dtype of queries"),
    (lambda op: op(torch.ones(2, 3, dtype=torch.int32), torch.ones(4, 3, dtype=torch.int32), "l1"), "must be float"),
])
def test_kernel_checks_its_inputs(bad_call, message):
    # Callers of torch.ops.ign_fast.* directly bypass the Python checks: the kernels check too.
    with pytest.raises(RuntimeError, match=message):
        bad_call(torch.ops.ign_fast.nearest_neighbors)


@requires_ext
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_opcheck(device, metric):
    for (b, m, d), dtype in [((3, 5, 7), torch.float32), ((4, 9, 33), torch.bfloat16), ((0, 3, 4), torch.float32)]:
        q = torch.randn(b, d, device=device).to(dtype)
        c = torch.randn(m, d, device=device).to(dtype)
        opcheck(torch.ops.ign_fast.nearest_neighbors.default, (q, c, metric))


@requires_ext
def test_torch_compile_traces_the_op():
    q, c = torch.randn(6, 10), torch.randn(30, 10)
    compiled = torch.compile(lambda q, c: ign_fast.nearest_neighbors(q, c, "l2"), backend="aot_eager",
                             fullgraph=True)
    index, distance = compiled(q, c)
    ref = reference.nearest_neighbors(q, c, "l2")
    assert torch.equal(index, ref[0])


@requires_cuda
@requires_ext
def test_cuda_kernel_rejects_float64_and_the_entry_falls_back():
    q, c = torch.randn(4, 6, device="cuda", dtype=torch.float64), torch.randn(9, 6, device="cuda", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16 on CUDA"):
        torch.ops.ign_fast.nearest_neighbors(q, c, "l1")
    index, distance = ign_fast.nearest_neighbors(q, c, "l1")
    assert_nearest(q, c, "l1", index, distance, exact=True)


@requires_cuda
@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_cuda_matches_cpu_at_benchmark_shape(metric):
    q = torch.randn(256, 784)
    c = torch.randn(20000, 784)
    index, distance = ign_fast.nearest_neighbors(q.cuda(), c.cuda(), metric)
    assert_nearest(q, c, metric, index.cpu(), distance.cpu(), exact=False)


TRITON_SCRIPT = textwrap.dedent("""
    import os
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch, ign_fast
    from ign_fast.kernels.nearest_neighbors import nearest_neighbors_triton
    sys_path_tests = {tests!r}
    import sys; sys.path.insert(0, sys_path_tests)
    from test_nearest_neighbors import assert_nearest, exact_search_small
    torch.manual_seed(0)
    checked = 0
    for metric in ("l1", "l2"):
        for (b, m, d) in ((1, 1, 1), (3, 5, 7), (9, 40, 40)):
            for dtype in (torch.float64, torch.float32, torch.bfloat16):
                q = torch.randn(b, d).to(dtype); c = torch.randn(m, d).to(dtype)
                index, distance = nearest_neighbors_triton(q, c, metric, splits=3)
                assert distance.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
                assert_nearest(q, c, metric, index, distance, exact=dtype == torch.float64)
                checked += 1
        # ties: small integers, and duplicates spread over different splits
        q = torch.randint(-2, 3, (17, 5)).float(); c = torch.randint(-2, 3, (90, 5)).float()
        index, distance = nearest_neighbors_triton(q, c, metric, splits=4)
        dist = exact_search_small(q, c, metric)
        assert torch.equal(index, torch.tensor([int(torch.nonzero(r == r.min())[0]) for r in dist]))
        base = torch.randn(4, 9); cands = torch.cat([torch.randn(20, 9), base, torch.randn(30, 9), base])
        index, distance = nearest_neighbors_triton(base, cands, metric, splits=4)
        assert index.tolist() == [20, 21, 22, 23] and bool((distance == 0).all())
        # the public entry with the triton backend
        ign_fast.set_backend("triton")
        index, _ = ign_fast.nearest_neighbors(base.reshape(4, 3, 3), cands, metric)
        ign_fast.set_backend("auto")
        assert index.tolist() == [20, 21, 22, 23]
        checked += 3
    print("triton checks", checked)
""")


def test_triton_kernel_under_interpreter():
    pytest.importorskip("triton")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", TRITON_SCRIPT.format(tests=tests_dir)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "triton checks 24" in out.stdout


def test_triton_backend_refuses_cpu_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    from ign_fast.kernels.nearest_neighbors import nearest_neighbors_triton

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # read at call time, so this process stays clean
    with pytest.raises(RuntimeError, match="needs a CUDA GPU, or TRITON_INTERPRET=1"):
        nearest_neighbors_triton(torch.randn(2, 3), torch.randn(4, 3), "l1")


MATMUL_PRECISION_SCRIPT = textwrap.dedent("""
    import torch, ign_fast
    torch.manual_seed(0)
    q = 300 + 0.01 * torch.randn(40, 100); c = 300 + 0.01 * torch.randn(300, 100)
    dist = torch.cdist(q.double(), c.double(), compute_mode="donot_use_mm_for_euclid_dist")
    expected = dist.argmin(dim=1)
    def check(label):
        index, _ = ign_fast.nearest_neighbors(q, c, "l2")
        top2 = dist.topk(2, dim=1, largest=False).values
        clear = (top2[:, 1] - top2[:, 0]) / top2[:, 0] > 1e-5
        assert torch.equal(index[clear], expected[clear]), label
        print("ok", label)
    check("highest")
    torch.set_float32_matmul_precision("medium")  # may round GEMM inputs to bf16: the screen must widen
    check("medium")
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # legacy and new settings mixed: the legacy query throws
    check("mixed")
""")


@requires_ext
def test_l2_screen_under_reduced_matmul_precision():
    # In a subprocess: these global settings would leak into other tests. On CPUs where at::mm really rounds
    # to bf16 this checks the widened screen; everywhere it checks the mixed-settings query does not throw.
    out = subprocess.run([sys.executable, "-c", MATMUL_PRECISION_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", "highest", "ok", "medium", "ok", "mixed"]
