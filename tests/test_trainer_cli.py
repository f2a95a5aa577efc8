"""The trainer and CLI end to end on tiny runs: train, sample, project, resume, and clean errors."""
import argparse
import csv
import dataclasses
import json
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


def test_resume_without_the_runs_flags_continues_the_run_as_trained(tmp_path, capsys):
    """The README's `ign-fast train --resume --out RUN --steps N`, on a run trained with flags other than the
    defaults (the paper's objective with an IMLE pull, its own lr and betas): the options left out are the saved
    run's, so it goes on exactly as the uninterrupted run does; it once went on as default NAIGN."""
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    recipe = ["--objective", "ign", "--lambda-imle", "8", "--tight-warmup", "4", "--tight-warmup-shape", "exp",
              "--lr", "3e-4", "--beta1", "0.8", "--batch-size", "16", "--latent-dim", "8", "--width", "8",
              "--no-progress", "--log-every", "1", "--checkpoint-every", "3", "--sample-every", "100"]
    assert main(["train", *recipe, "--out", full, "--steps", "6"]) == 0
    assert main(["train", *recipe, "--out", split, "--steps", "3"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", split, "--steps", "6", "--no-progress"]) == 0
    assert "resume:" not in capsys.readouterr().err  # nothing changed, nothing to say
    assert read_losses(split) == read_losses(full)
    with open(os.path.join(split, "config.json")) as f:
        saved = json.load(f)
    assert (saved["objective"], saved["lambda_imle"], saved["lr"], saved["beta1"]) == ("ign", 8.0, 3e-4, 0.8)


def test_resume_applies_a_changed_lr_and_betas_and_says_so(tmp_path, capsys):
    """A setting written out at resume is the run's from there on: in the optimizer (whose saved state once
    kept the old lr and betas while config.json claimed the new ones), in config.json, and said on stderr."""
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--out", run, "--steps", "2", "--lr", "2e-3"]) == 0
    capsys.readouterr()
    assert main(["train", *TINY, "--out", run, "--steps", "4", "--resume", "--lr", "1e-3", "--beta1", "0.9"]) == 0
    err = capsys.readouterr().err
    assert "resume: lr 0.002 -> 0.001, beta1 0.5 -> 0.9" in err, err
    groups = ckpt.load_checkpoint(run)["optimizer"]["param_groups"]
    assert [(g["lr"], tuple(g["betas"])) for g in groups] == [(1e-3, (0.9, 0.999))]
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["lr"] == 1e-3
    # the Python API: the config given is the run's; the optimizer follows it
    trainer = Trainer(TrainConfig(latent_dim=8, width=8, batch_size=16, steps=5, lr=5e-4, beta2=0.99,
                                  progress=False, out=run), resume=True)
    assert [(g["lr"], tuple(g["betas"])) for g in trainer.optimizer.param_groups] == [(5e-4, (0.5, 0.99))]
    trainer.close()


def test_resume_refuses_a_setting_fixed_at_the_start_and_keeps_the_run(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--out", run, "--steps", "2", "--objective", "ign"]) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", *TINY, "--out", run, "--steps", "4", "--resume", "--objective", "naign"]) == 2
    one_error_line(capsys, "resume needs the checkpoint's objective 'ign', got 'naign'", "--overwrite")
    assert main(["train", *TINY, "--out", run, "--steps", "4", "--resume", "--prior", "fourier"]) == 2
    one_error_line(capsys, "prior 'gaussian', got 'fourier'")
    assert snapshot(run) == before  # config.json, metrics and checkpoints as they were
    with pytest.raises(ckpt.CheckpointError, match="objective 'ign', got 'naign'"):
        Trainer(TrainConfig(latent_dim=8, width=8, batch_size=16, progress=False, out=run), resume=True)


@pytest.mark.parametrize("flag", ["--prior", "--sample-prior"])
def test_mixture_prior_run_resumes_exactly_and_keeps_its_fitted_prior(tmp_path, capsys, flag):
    """A mixture prior is fitted to the data when the run starts and saved with it: a resumed run goes on as the
    uninterrupted one, generation (Projector, export) draws from it, and its settings are fixed at the start.
    --prior mixture also trains from it; --sample-prior mixture trains from gaussian noise."""
    from ign_fast import Projector
    from ign_fast.export import export_projector, load_torchscript
    from ign_fast.noise import GaussianPrior, MixturePrior

    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    args = ["train", *TINY, flag, "mixture", "--prior-components", "4", "--prior-rank", "2",
            "--checkpoint-every", "2", "--sample-every", "100"]
    assert main(args + ["--out", full, "--steps", "4"]) == 0
    assert main(args + ["--out", split, "--steps", "2"]) == 0
    assert main(["train", "--resume", "--out", split, "--steps", "4", "--no-progress"]) == 0
    assert read_losses(full) == read_losses(split)
    state = ckpt.load_checkpoint(split)
    own = flag == "--sample-prior"
    assert (state["sample_prior"] is not None) == own
    assert (ckpt.SAMPLE_PRIOR_FILE in os.listdir(state["folder"])) == own
    assert state["meta"]["prior_config"]["kind"] == ("gaussian" if own else "mixture")
    saved = state["sample_prior"] if own else state["prior"]
    projector = Projector.load(split)
    prior = projector.prior
    assert isinstance(prior, MixturePrior) and tuple(prior.stds.shape) == (4, 2)
    assert torch.equal(prior.means, saved["means"]) and prior.weights.sum().item() == pytest.approx(1.0)
    if own:  # the trainer itself draws its training noise from a standard normal prior
        trainer = Trainer(TrainConfig(latent_dim=8, width=8, batch_size=16, steps=4, progress=False, out=split,
                                      sample_prior="mixture", prior_components=4, prior_rank=2), resume=True)
        assert isinstance(trainer.prior, GaussianPrior) and trainer.sample_prior is not trainer.prior
        assert torch.equal(trainer.sample_prior.means, saved["means"])
        trainer.close()
        # restore's "latent" starts are the noise f trained on, whatever generate draws from: the same result
        # with the mixture and with the training prior set as the projector's prior
        from ign_fast.operators import Mask

        assert isinstance(projector.training_prior, GaussianPrior)
        x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1
        known = torch.ones(1, 1, 28, 28)
        known[..., 8:20, 8:20] = 0
        restored = projector.restore(Mask(known).A(x), Mask(known), method="latent", steps=2, starts=2)
        gaussian = Projector.load(split).set_prior(projector.training_prior)
        torch.testing.assert_close(gaussian.restore(Mask(known).A(x), Mask(known), method="latent", steps=2,
                                                    starts=2), restored)
        # --training-prior: z from the standard normal noise it trained from, not from the mixture
        from safetensors.torch import load_file

        for extra, expected in (([], prior.sample(3, generator=torch.Generator().manual_seed(0))),
                                (["--training-prior"], torch.randn(3, 1, 28, 28,
                                                                   generator=torch.Generator().manual_seed(0)))):
            out = str(tmp_path / f"samples{len(extra)}")
            assert main(["sample", split, "--n", "3", "--steps", "1", "--out", out, *extra]) == 0
            tensors, = [name for name in os.listdir(out) if name.endswith(".safetensors")]
            z = load_file(os.path.join(out, tensors))["z"]
            torch.testing.assert_close(z, expected)
    else:
        assert projector.training_prior is projector.prior
    path = str(tmp_path / "f.pt")
    export_projector(projector.model, path, prior=prior)
    scripted, metadata = load_torchscript(path)
    assert metadata["prior"] == "mixture"
    torch.testing.assert_close(scripted.generate(3, 5), projector.generate(3, seed=5), atol=1e-5, rtol=0)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", split, "--steps", "6", "--prior-components", "8"]) == 2
    one_error_line(capsys, "prior_components 4, got 8")
    assert main(["train", *TINY, "--out", str(tmp_path / "c"), "--steps", "1", flag, "mixture",
                 "--conditional"]) == 2
    one_error_line(capsys, f"{flag[2:].replace('-', '_')} 'mixture' cannot be used with conditional")
    assert main(["train", *TINY, "--out", str(tmp_path / "k"), "--steps", "1", flag, "mixture",
                 "--prior-components", "0"]) == 2
    one_error_line(capsys, "prior_components must be a positive integer, got 0")
    assert main(["train", *TINY, "--out", str(tmp_path / "m"), "--steps", "1", flag, "mixture",
                 "--prior-components", "5000"]) == 2
    one_error_line(capsys, "prior_components must be at most the number of data samples the mixture is fitted to "
                           "(4000), got 5000")
    assert not os.path.exists(str(tmp_path / "m"))
    assert main(["train", *TINY, "--out", str(tmp_path / "b"), "--steps", "1", "--sample-prior", "uniform"]) == 2
    one_error_line(capsys, "sample_prior must be one of gaussian, fourier, mixture or None")


def test_eval_of_a_run_that_is_not_digits_says_what_measures_it_instead(tmp_path, capsys):
    run = str(tmp_path / "toy")
    assert main(["train", "--data", "moons", "--model", "mlp", "--steps", "1", "--batch-size", "16", "--out", run,
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", run]) == 2
    one_error_line(capsys, "eval measures digit models", "(2,)", "inception_fid", "restore RUN --images")


def test_given_train_options_tells_a_flag_at_its_default_from_an_absent_one():
    from ign_fast.cli import given_train_options

    assert given_train_options(["--out", "r", "--lr", "5e-4", "--no-progress", "--resume"]) == {
        "out", "lr", "no_progress", "resume"}
    assert given_train_options(["--beta1=0.5", "--steps", "3"]) == {"beta1", "steps"}
    assert given_train_options([]) == set()


def test_cosine_lr_schedule_values_and_exact_resume(tmp_path):
    def config(out, schedule="cosine"):
        return TrainConfig(objective="naign", candidates=2, refresh_every=2, latent_dim=8, width=8, batch_size=16,
                           steps=6, lr=1e-3, lr_schedule=schedule, checkpoint_every=3, sample_every=100,
                           log_every=1, progress=False, out=str(tmp_path / out))

    full = Trainer(config("full"))
    assert [round(full.learning_rate(s) / 1e-3, 6) for s in (0, 3, 6)] == [1.0, 0.5, 0.0]
    full.fit()
    assert full.optimizer.param_groups[0]["lr"] == pytest.approx(full.learning_rate(5))  # the last update's
    split = Trainer(config("split"))
    split.fit(steps=3)  # stopped half way, as a crash would, with the same --steps: the schedule is unchanged
    Trainer(config("split"), resume=True).fit()
    assert read_losses(str(tmp_path / "split")) == read_losses(str(tmp_path / "full"))
    Trainer(config("constant", "constant")).fit()
    assert read_losses(str(tmp_path / "constant"))[3:] != read_losses(str(tmp_path / "full"))[3:]
    with pytest.raises(ValueError, match="lr_schedule 'cosine' needs step_mode"):
        Trainer(dataclasses.replace(config("graph"), step_mode="graph"))
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, cosine"):
        Trainer(dataclasses.replace(config("bad"), lr_schedule="linear"))


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
    assert os.path.isfile(tmp_path / "s" / "sample_step_00000002.png")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "s" / "sample_step_00000002.safetensors"))
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
    (["train", "--beta1", "1"], "beta1 must be a number in [0, 1)"),
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


def test_adam_betas_from_the_command_line_reach_the_optimizer(tmp_path):
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--out", run, "--steps", "1", "--beta1", "0.9", "--beta2", "0.99"]) == 0
    groups = ckpt.load_checkpoint(run)["optimizer"]["param_groups"]
    assert [tuple(g["betas"]) for g in groups] == [(0.9, 0.99)]


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


# ----------------------------------------------------------------------------- what a new user hit (issue 12)


@pytest.fixture(scope="module")
def digit_run(tmp_path_factory):
    """A 4-step digit run with checkpoints at steps 2 and 4; tests that change it work on a copy."""
    run = str(tmp_path_factory.mktemp("digit_run") / "run")
    assert main(["train", *TINY, "--out", run, "--steps", "4", "--checkpoint-every", "2"]) == 0
    return run


def copy_run(run, tmp_path):
    import shutil

    return shutil.copytree(run, str(tmp_path / "copy"))


def snapshot(run):
    """Every file of a run folder and its bytes."""
    files = {}
    for folder, _, names in os.walk(run):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, run)] = f.read()
    return files


def one_error_line(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_training_into_a_used_run_folder_is_refused_and_the_old_run_kept(digit_run, tmp_path, capsys):
    run = copy_run(digit_run, tmp_path)
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", *TINY, "--out", run, "--steps", "1"]) == 2
    one_error_line(capsys, "is not empty", "--resume", "--out", "--overwrite")
    assert snapshot(run) == before
    assert ckpt.load_checkpoint(run)["meta"]["step"] == 4


def test_overwrite_starts_a_new_run_and_keeps_the_users_other_files(digit_run, tmp_path):
    run = copy_run(digit_run, tmp_path)
    with open(os.path.join(run, "notes.txt"), "w") as f:
        f.write("mine")
    assert main(["train", *TINY, "--out", run, "--steps", "2", "--checkpoint-every", "1", "--overwrite"]) == 0
    assert sorted(n for n in os.listdir(os.path.join(run, "checkpoints")) if n.startswith("step_")) == [
        "step_00000001", "step_00000002"]
    assert ckpt.load_checkpoint(run)["meta"]["step"] == 2
    assert [s for s, _ in read_losses(run)] == [1, 2]
    assert open(os.path.join(run, "notes.txt")).read() == "mine"
    assert main(["train", *TINY, "--out", run, "--resume", "--overwrite"]) == 2


def test_pruning_keeps_the_checkpoint_just_written_and_latest_valid(tmp_path):
    """A run resumed below checkpoints of higher step numbers (another history): keep=1 once deleted the
    new checkpoint at once and left `latest` naming a folder that no longer existed."""
    from ign_fast.models import build_model
    from ign_fast.noise import GaussianPrior

    model = build_model("mlp", dim=2)
    optimizer = torch.optim.Adam(model.parameters())
    run = str(tmp_path / "run")

    def save(step, keep):
        return ckpt.save_checkpoint(run, step, model=model, optimizer=optimizer, prior=GaussianPrior((2,)),
                                    meta={"model_config": model.config}, rng_states={"cpu": torch.get_rng_state()},
                                    keep=keep)

    for step in (100, 200):
        save(step, keep=3)
    written = save(5, keep=1)
    assert os.path.isdir(written)
    assert ckpt.resolve_checkpoint(run) == written
    assert ckpt.load_checkpoint(run)["meta"]["step"] == 5
    names = sorted(n for n in os.listdir(os.path.join(run, "checkpoints")) if n.startswith("step_"))
    assert names == ["step_00000005", "step_00000100", "step_00000200"]  # the other history is not ours to prune
    save(6, keep=1)
    save(7, keep=2)
    names = sorted(n for n in os.listdir(os.path.join(run, "checkpoints")) if n.startswith("step_"))
    assert names == ["step_00000006", "step_00000007", "step_00000100", "step_00000200"]


def test_checkpoints_follow_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run = str(tmp_path / "run")
        assert main(["train", *TINY, "--out", run, "--steps", "1"]) == 0
    finally:
        os.umask(old)
    root = os.path.join(run, "checkpoints")
    folder = ckpt.resolve_checkpoint(run)
    assert os.stat(folder).st_mode & 0o777 == 0o755
    for path in [os.path.join(root, ckpt.LATEST)] + [os.path.join(folder, f) for f in ckpt.CHECKPOINT_FILES]:
        assert os.stat(path).st_mode & 0o777 == 0o644, path


def test_piped_training_logs_plain_lines(tmp_path, capsys):
    """Not on a terminal (pytest captures both streams): plain lines on stdout every --log-every steps, no
    progress-bar frames; --no-progress gives the same lines rather than silence until the end."""
    for extra in ([], ["--no-progress"]):
        run = str(tmp_path / f"run{len(extra)}")
        args = ["train", "--latent-dim", "8", "--width", "8", "--batch-size", "16", "--steps", "4",
                "--log-every", "2", "--out", run, *extra]
        assert main(args) == 0
        captured = capsys.readouterr()
        assert "\r" not in captured.err and "\r" not in captured.out
        lines = [line for line in captured.out.splitlines() if line.startswith("step ")]
        assert [line.split()[1] for line in lines] == ["2/4", "4/4"], captured.out
        assert all("loss" in line and "steps/s" in line and "ETA" in line for line in lines)


def test_train_summary_counts_this_calls_steps_and_a_run_past_its_target_says_so(digit_run, tmp_path, capsys):
    import re

    run = copy_run(digit_run, tmp_path)
    capsys.readouterr()
    assert main(["train", *TINY, "--out", run, "--steps", "6", "--resume"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"trained 2 steps \(steps 5-6\) in \d+\.\d s", out), out
    assert main(["train", *TINY, "--out", run, "--steps", "3", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "nothing to train" in out and "already at step 6, past --steps 3" in out and "trained" not in out


def test_every_option_has_help_and_step_mode_lists_its_choices():
    from ign_fast.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    train = {a.dest: a.help for a in commands["train"]._actions}
    assert all(mode in train["step_mode"] for mode in ("auto", "reference", "fused", "graph"))
    assert "total" in train["steps"] and "--resume" in train["steps"]


@pytest.mark.parametrize("argv, named, not_named", [
    (["sample", "RUN", "--n", "0"], "--n must be", "--steps"),
    (["sample", "RUN", "--steps", "0"], "--steps must be", "--n "),
    (["project", "RUN", "--n", "-3"], "--n must be", "--steps"),
    (["project", "RUN", "--steps", "0"], "--steps must be", "--n "),
    (["eval", "RUN", "--n", "3"], "--n must be an integer >= 6", "--steps"),
    (["project", "RUN", "--invert", "maybe"], "--invert must be auto, yes or no", "--n"),
])
def test_errors_name_the_one_argument_at_fault(digit_run, capsys, argv, named, not_named):
    argv = [digit_run if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    err = one_error_line(capsys, named)
    assert not_named not in err


def test_a_batch_larger_than_the_data_set_says_so_plainly(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "five"
    folder.mkdir()
    for i in range(5):
        Image.new("L", (28, 28), color=40 * i).save(folder / f"{i}.png")
    assert main(["train", "--data", "images", "--data-root", str(folder), "--image-size", "28", "--latent-dim",
                 "8", "--width", "8", "--no-progress", "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    one_error_line(capsys, "batch_size 64 is larger than the data set", "has 5 samples", "at most 5")


def test_a_data_root_that_is_a_file_or_missing_names_data_root(tmp_path, capsys):
    a_file = tmp_path / "digits.png"
    a_file.write_bytes(b"not a folder")
    for root in (a_file, tmp_path / "missing"):
        assert main(["train", "--data", "images", "--data-root", str(root), "--no-progress", "--steps", "1",
                     "--out", str(tmp_path / "run")]) == 2
        one_error_line(capsys, "data_root (--data-root) must be an existing folder", str(root))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_checkpoint_without_model_config_is_one_line_for_every_command(digit_run, tmp_path, capsys):
    import json

    run = copy_run(digit_run, tmp_path)
    meta_path = os.path.join(ckpt.resolve_checkpoint(run), "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["model_config"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    capsys.readouterr()
    for argv in (["sample", run], ["ood", run], ["export", run, "--out", str(tmp_path / "f.pt")],
                 ["project", run, "--n", "5"], ["eval", run, "--n", "10"]):
        assert main(argv) == 2, argv
        one_error_line(capsys, "lacks model_config")


def test_sample_and_project_write_beside_the_run_not_above_a_step_folder(digit_run, tmp_path, capsys):
    import shutil

    run = copy_run(digit_run, tmp_path)
    assert main(["sample", run, "--n", "4"]) == 0
    assert sorted(os.listdir(os.path.join(run, "samples"))) == [
        "sample_step_00000004.png", "sample_step_00000004.safetensors", "step_00000004.png"]
    assert not os.path.exists(os.path.join(run, "sample"))
    kept = tmp_path / "kept"
    kept.mkdir()
    step = shutil.copytree(ckpt.resolve_checkpoint(run), str(kept / "step_00000004"))
    assert main(["sample", step, "--n", "4"]) == 0
    assert main(["project", step, "--n", "5"]) == 0
    assert os.path.isfile(kept / "samples" / "sample_step_00000004.png")
    assert os.path.isfile(kept / "project" / "project_noise.png")
    # nothing written into the checkpoint (the EMA file is the trainer's own, the default)
    assert sorted(os.listdir(step)) == sorted(ckpt.CHECKPOINT_FILES + (ckpt.EMA_FILE,))
    assert sorted(os.listdir(tmp_path)) == ["copy", "kept"]


def test_project_images_refuses_a_non_image_and_an_empty_list(digit_run, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    capsys.readouterr()
    assert main(["project", digit_run, "--images", str(notes), "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "--images", "notes.txt", "is not an image file")
    with pytest.raises(SystemExit) as info:  # argparse: one usage line, exit 2, not the noise benchmark
        main(["project", digit_run, "--images", "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    assert "expected at least one argument" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_project_images_with_one_stem_write_one_file_each(digit_run, tmp_path, capsys):
    from PIL import Image

    Image.new("L", (28, 28), color=10).save(tmp_path / "seven.png")
    Image.new("L", (28, 28), color=250).convert("RGB").save(tmp_path / "seven.jpg")
    out = tmp_path / "o"
    assert main(["project", digit_run, "--images", str(tmp_path / "seven.png"), str(tmp_path / "seven.jpg"),
                 "--invert", "no", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["seven_jpg_projected.png", "seven_png_projected.png"]
    with Image.open(out / "seven_png_projected.png") as a, Image.open(out / "seven_jpg_projected.png") as b:
        assert a.tobytes() != b.tobytes()
    (tmp_path / "other").mkdir()
    Image.new("L", (28, 28)).save(tmp_path / "other" / "seven.png")
    capsys.readouterr()
    assert main(["project", digit_run, "--images", str(tmp_path / "seven.png"), str(tmp_path / "other" / "seven.png"),
                 "--out", str(tmp_path / "o2")]) == 2
    one_error_line(capsys, "other/seven.png", "would both be written as")


def test_project_images_inverts_a_dark_on_white_scan_for_a_digit_model(digit_run, tmp_path, capsys):
    from PIL import Image

    from ign_fast.data import load_mnist5k

    digit = load_mnist5k("test")[0][0, 0]
    pixels = ((digit + 1) * 127.5).round().to(torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "digit.png")
    Image.fromarray(255 - pixels).save(tmp_path / "scan.png")  # dark strokes on white paper
    capsys.readouterr()
    assert main(["project", digit_run, "--images", str(tmp_path / "scan.png"), str(tmp_path / "digit.png"),
                 "--out", str(tmp_path / "auto")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "inverted" in lines[0] and "inverted" not in lines[1], lines
    with Image.open(tmp_path / "auto" / "scan_projected.png") as a, \
            Image.open(tmp_path / "auto" / "digit_projected.png") as b:
        # the scan, inverted, is the digit itself (to float rounding, one grey level after quantisation)
        assert max(abs(x - y) for x, y in zip(a.tobytes(), b.tobytes())) <= 1
    assert main(["project", digit_run, "--images", str(tmp_path / "scan.png"), "--invert", "no", "--out",
                 str(tmp_path / "no")]) == 0
    with Image.open(tmp_path / "no" / "scan_projected.png") as a, \
            Image.open(tmp_path / "auto" / "scan_projected.png") as b:
        assert a.tobytes() != b.tobytes()


def test_load_png_center_crops_a_non_square_image_as_training_does(tmp_path):
    from PIL import Image

    from ign_fast.images import load_png

    wide = Image.new("L", (90, 30), color=255)
    wide.paste(0, (30, 0, 60, 30))  # white | black | white: the center square is black
    wide.save(tmp_path / "wide.png")
    loaded = load_png(str(tmp_path / "wide.png"), size=28)
    assert loaded.shape == (1, 1, 28, 28)
    assert float(loaded.mean()) < -0.9  # squashed, a third of it would be white
