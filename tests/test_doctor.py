"""ign-fast doctor: passes on this machine, catches a broken kernel or step (exit 1), writes JSON, and answers bad
usage with one line and exit 2."""
import json
import os
import subprocess
import sys

import pytest
import torch

import ign_fast
from ign_fast import _extension, cli, doctor, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
requires_extension = pytest.mark.skipif(not _extension.HAS_C, reason="needs the compiled extension ign_fast._C")
# the in-process runs are many small tensors: one thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def run_in_process(tmp_path, *argv):
    """doctor.main in this process; (exit status, {(check, device, dtype, backend): row})."""
    path = tmp_path / "doctor.json"
    status = doctor.main([*argv, "--json", str(path)])
    report = json.loads(path.read_text())
    return status, report, {(r["check"], r["device"], r["dtype"], r["backend"]): r for r in report["checks"]}


def test_doctor_passes_on_this_machine(tmp_path):
    # a fresh process, as a user runs it: no TRITON_INTERPRET (conftest sets it for this process)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    path = tmp_path / "doctor.json"
    proc = subprocess.run([sys.executable, "-m", "ign_fast.doctor", "--json", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(path.read_text())
    assert report["passed"] is True and report["counts"]["FAIL"] == 0
    checks = {(r["check"], r["device"], r["backend"]) for r in report["checks"]}
    backends = ["torch"] + (["native"] if _extension.HAS_C else [])
    for backend in backends:
        for dtype in ("float32", "bfloat16", "float64"):
            for name in ("per_sample_distance l1", "ign_loss l1 clamp", "ign_loss l1 clamp aliased",
                         "nearest_neighbors l2 index", "nearest_neighbors l2 distance"):
                assert any(r["check"] == name and r["device"] == "cpu" and r["dtype"] == dtype and
                           r["backend"] == backend and r["status"] == "PASS" for r in report["checks"]), \
                    (name, dtype, backend)
    assert ("IGNStep fused vs reference, dcgan28-group", "cpu", "auto") in checks
    assert ("NAIGNStep fused vs plain NAIGN update", "cpu", "auto") in checks
    # every line of the table names its check, and the JSON holds the same lines
    assert proc.stdout.count("PASS") == report["counts"]["PASS"]
    for row in report["checks"]:
        if row["status"] == "PASS" and row["error"] is not None:
            assert row["error"] <= row["tolerance"]


@requires_extension
@pytest.mark.parametrize("which", ["forward", "backward"])
def test_a_broken_native_kernel_fails_the_check(tmp_path, monkeypatch, which):
    # the op ign_fast.ops dispatches to, returning values (or gradients) off by 0.1%
    if which == "forward":
        real = torch.ops.ign_fast.per_sample_distance
        monkeypatch.setattr(torch.ops.ign_fast, "per_sample_distance", lambda a, b, kind: real(a, b, kind) * 1.001)
    else:
        real = torch.ops.ign_fast.per_sample_distance_backward

        def broken(grad, a, b, kind):
            grad_a, grad_b = real(grad, a, b, kind)
            return grad_a, grad_b * 1.02  # beyond bfloat16's tolerance too

        monkeypatch.setattr(torch.ops.ign_fast, "per_sample_distance_backward", broken)
    backend_before = ops.get_backend()
    status, report, rows = run_in_process(tmp_path, "--device", "cpu", "--backend", "native", "--checks", "ops")
    assert status == doctor.EXIT_MISMATCH and report["passed"] is False
    for dtype in ("float32", "bfloat16", "float64"):
        for kind in ("l1", "l2"):
            row = rows[(f"per_sample_distance {kind}", "cpu", dtype, "native")]
            assert row["status"] == "FAIL" and row["error"] > row["tolerance"], row
            assert ("grad_b" if which == "backward" else "d ") in row["detail"], row
        # the other ops do not call this op: they still pass, so the failure points at the broken kernel
        assert rows[("ign_loss l1 clamp", "cpu", dtype, "native")]["status"] == "PASS"
    assert ops.get_backend() == backend_before  # the doctor leaves the process as it found it


@requires_extension
def test_a_kernel_that_raises_is_a_failed_check_and_the_rest_still_run(tmp_path, monkeypatch):
    def broken(queries, candidates, metric):
        raise RuntimeError("illegal memory access (planted)")

    monkeypatch.setattr(torch.ops.ign_fast, "nearest_neighbors", broken)
    status, _, rows = run_in_process(tmp_path, "--device", "cpu", "--backend", "native", "--checks", "ops")
    assert status == doctor.EXIT_MISMATCH
    row = rows[("nearest_neighbors l1", "cpu", "float32", "native")]
    assert row["status"] == "FAIL" and "planted" in row["detail"]
    assert rows[("per_sample_distance l1", "cpu", "float32", "native")]["status"] == "PASS"


def test_a_broken_step_mode_fails_the_check(tmp_path, monkeypatch):
    class BrokenFused(ign_fast.IGNStep):
        """mode="fused" that nudges one weight after each update, as a wrong gradient would."""

        def __init__(self, model, optimizer, loss=None, mode="reference", **kwargs):
            super().__init__(model, optimizer, loss=loss, mode=mode, **kwargs)
            self.broken = mode == "fused"

        def __call__(self, x, z):
            out = super().__call__(x, z)
            if self.broken:
                with torch.no_grad():
                    next(self.model.parameters()).view(-1)[0] += 1e-3
            return out

    monkeypatch.setattr(ign_fast, "IGNStep", BrokenFused)
    status, _, rows = run_in_process(tmp_path, "--device", "cpu", "--checks", "steps")
    assert status == doctor.EXIT_MISMATCH
    for dtype in ("float64", "float32"):
        row = rows[("IGNStep fused vs reference, dcgan28-group", "cpu", dtype, "auto")]
        assert row["status"] == "FAIL" and "parameters" in row["detail"], row
        assert rows[("NAIGNStep fused vs plain NAIGN update", "cpu", dtype, "auto")]["status"] == "PASS"


def test_json_output_parses_and_matches_the_table(tmp_path, capsys):
    status, report, rows = run_in_process(tmp_path, "--device", "cpu", "--backend", "torch", "--checks", "ops")
    printed = capsys.readouterr().out
    assert status == doctor.EXIT_OK and report["passed"] is True
    assert set(report["facts"]) >= {"extension_loaded", "cuda_built", "torch_running", "cuda_available"}
    assert len(report["checks"]) == sum(report["counts"].values())
    for row in report["checks"]:
        assert set(row) >= {"check", "device", "dtype", "backend", "error", "tolerance", "status", "detail"}
        assert row["check"] in printed


@pytest.mark.parametrize("argv, names", [
    (["--backend", "cuDNN"], "--backend"),
    (["--device", "tpu"], "--device"),
    (["--json", "/nonexistent-folder/doctor.json"], "--json"),
    (["--checks", "kernels"], "--checks"),
])
def test_bad_usage_is_one_line_and_exit_2(argv, names, capsys):
    for main in (doctor.main, lambda a: cli.main(["doctor", *a])):
        assert main(argv) == doctor.EXIT_USAGE
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and names in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_asking_for_cuda_without_a_gpu_is_usage(capsys):
    assert doctor.main(["--device", "cuda"]) == doctor.EXIT_USAGE
    assert "--device cuda" in capsys.readouterr().err


def test_bad_syntax_exits_2():
    with pytest.raises(SystemExit) as exit_info:
        doctor.main(["--seed", "x"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("has_c, error, gpu, cuda_built, expected", [
    (False, "undefined symbol: _ZN3c10", False, False, {"extension loaded": "FAIL"}),
    (False, "disabled by IGN_FAST_DISABLE_EXTENSION", False, False, {"extension loaded": "SKIP"}),
    (True, None, True, False, {"extension loaded": "PASS", "CUDA kernels built": "FAIL"}),
    (True, None, False, False, {"extension loaded": "PASS"}),  # no GPU: CPU kernels are all there is to build
])
def test_build_facts_are_checks(monkeypatch, has_c, error, gpu, cuda_built, expected):
    # a missing extension fails unless disabled on purpose; a GPU without CUDA kernels fails
    monkeypatch.setattr(_extension, "HAS_C", has_c)
    monkeypatch.setattr(_extension, "LOAD_ERROR", error)
    monkeypatch.setattr(_extension, "CUDA_BUILT", cuda_built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    if has_c and _extension._C is None:
        pytest.skip("needs the compiled extension ign_fast._C (its build facts are read)")
    results = []
    doctor.build_checks(results)
    assert {r.check: r.status for r in results} == expected
