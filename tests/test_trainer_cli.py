"""The trainer and CLI end to end on tiny runs: train, sample, project, resume, and clean errors."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from ign_fast import checkpoint as ckpt
from ign_fast.cli import main
from ign_fast.trainer import TrainConfig, Trainer

TINY = ["--latent-dim", "8", "--width", "8", "--batch-size", "16", "--no-progress", "--log-every", "1"]


def read_losses(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("objective", ["ign", "naign"])
def test_resume_reproduces_uninterrupted_run(tmp_path, objective):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    args = ["train", "--objective", objective, "--candidates", "2", "--refresh-every", "2", *TINY,
            "--checkpoint-every", "3", "--sample-every", "100"]
    assert main(args + ["--out", full, "--steps", "6"]) == 0
    assert main(args + ["--out", split, "--steps", "3"]) == 0
    assert main(args + ["--out", split, "--steps", "6", "--resume"]) == 0
    assert read_losses(full) == read_losses(split)
    assert [s for s, _ in read_losses(split)] == list(range(1, 7))


@pytest.mark.parametrize("objective", ["ign", "naign"])
def test_bf16_autocast_training_runs(tmp_path, objective):
    # the GPU default (amp bf16) exercised on the CPU: bf16 model outputs, float32 data and loss
    run = str(tmp_path / "run")
    trainer = Trainer(TrainConfig(objective=objective, amp="bf16", candidates=2, latent_dim=8, width=8, batch_size=16,
                                  steps=8, out=run, progress=False, log_every=1, checkpoint_every=100,
                                  sample_every=100))
    assert trainer.step_fn.amp_dtype == torch.bfloat16
    trainer.fit()
    losses = [float(loss) for _, loss in read_losses(run)]
    assert len(losses) == 8 and all(abs(v) < 1e6 for v in losses)  # abs(nan) < 1e6 is False


def test_sample_and_project_write_grids(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--out", run, "--steps", "2", "--checkpoint-every", "2"]) == 0
    assert os.path.isfile(os.path.join(run, "samples.png"))
    assert main(["sample", run, "--n", "9", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    assert os.path.isfile(tmp_path / "s" / "samples.png")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "s" / "samples.safetensors"))
    assert tensors["f_z"].shape == (9, 1, 28, 28) and "f2_z" in tensors
    for corruption in ("noise", "mask", "sketch"):
        assert main(["project", run, "--n", "20", "--corruption", corruption, "--out", str(tmp_path / "p")]) == 0
        assert os.path.isfile(tmp_path / "p" / f"project_{corruption}.png")
    assert "PSNR to clean digits" in capsys.readouterr().out


def test_project_image_files(tmp_path):
    from PIL import Image

    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--out", run, "--steps", "1"]) == 0
    Image.new("L", (40, 40), color=200).save(tmp_path / "in.png")
    assert main(["project", run, "--images", str(tmp_path / "in.png"), "--out", str(tmp_path / "o")]) == 0
    with Image.open(tmp_path / "o" / "in_projected.png") as img:
        assert img.size == (28, 28)


@pytest.mark.parametrize("argv, message", [
    (["sample", "/nonexistent/run"], "does not exist"),
    (["train", "--steps", "0"], "steps must be a positive integer"),
    (["train", "--norm", "layer"], "norm must be one of"),
    (["train", "--model", "dcgan64"], "needs images of 64x64"),
    (["train", "--data", "mnist"], "root"),
    (["train", "--lr", "-1"], "lr must be"),
    (["project", "RUN", "--corruption", "blur"], "corruption must be"),
])
def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, argv, message):
    if "RUN" in argv:
        run = str(tmp_path / "run")
        assert main(["train", *TINY, "--out", run, "--steps", "1"]) == 0
        capsys.readouterr()
        argv = [run if a == "RUN" else a for a in argv]
    if argv[0] == "train":
        argv = argv + ["--out", str(tmp_path / "bad")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_corrupt_checkpoint_is_refused(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--out", run, "--steps", "1"]) == 0
    folder = ckpt.resolve_checkpoint(run)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(b"\x00garbage")
    assert main(["sample", run]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_malicious_pickle_is_refused_without_running(tmp_path):
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--out", run, "--steps", "1"]) == 0
    folder = ckpt.resolve_checkpoint(run)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state": Exploit()}, os.path.join(folder, "optimizer.pt"))
    with pytest.raises(ckpt.CheckpointError, match="unsafe"):
        ckpt.load_checkpoint(run)
    assert not marker.exists()


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    trainer = Trainer(TrainConfig(objective="ign", steps=2, batch_size=8, latent_dim=8, width=8, out=run,
                                  progress=False))
    trainer.fit(1)
    trainer.fit(2)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)  # crash in the middle of writing the next checkpoint
    trainer.step = 3
    with pytest.raises(OSError):
        trainer.save()
    assert ckpt.resolve_checkpoint(run).endswith("step_00000002")
    assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if n.startswith(".tmp")]
    ckpt.load_checkpoint(run)


def test_keep_prunes_old_checkpoints(tmp_path):
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--out", run, "--steps", "4", "--checkpoint-every", "1", "--keep", "2"]) == 0
    names = sorted(n for n in os.listdir(os.path.join(run, "checkpoints")) if n.startswith("step_"))
    assert names == ["step_00000003", "step_00000004"]


def test_module_entry_point_exit_code_and_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ign_fast", "sample", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "does not exist" in out.stderr
