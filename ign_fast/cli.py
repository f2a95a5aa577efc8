"""ign-fast: train, sample, project, eval, ood. Errors a user can cause print one line and exit 2."""
import argparse
import dataclasses
import json
import os
import sys

import torch

EXIT_USAGE = 2
EXIT_TRAINING_FAILED = 1


class UsageError(Exception):
    pass


def _optional_float(text):
    return None if text.lower() in ("none", "off") else float(text)


def _add_train(sub):
    from .trainer import TrainConfig

    p = sub.add_parser("train", help="train on a data set (default: NAIGN on MNIST-5k)")
    d = TrainConfig()
    p.add_argument("--objective", default=d.objective, help="ign | naign (default %(default)s)")
    p.add_argument("--data", default=d.data, help="mnist5k | mnist | images | trimodal | 8gaussians | moons | rings")
    p.add_argument("--data-root", default=None, help="folder for --data mnist (IDX files) or images")
    p.add_argument("--image-size", type=int, default=None, help="resize for --data images")
    p.add_argument("--model", default=d.model, help="dcgan28 | dcgan64 | mlp")
    p.add_argument("--norm", default=d.norm, help="batch | group | none")
    p.add_argument("--latent-dim", type=int, default=d.latent_dim)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=None, help="default 256 (ign) or 64 (naign)")
    p.add_argument("--lr", type=float, default=None, help="default 1e-4 (ign) or 5e-4 (naign)")
    p.add_argument("--distance", default=d.distance, help="l1 | l2")
    p.add_argument("--lambda-rec", type=float, default=None)
    p.add_argument("--lambda-idem", type=float, default=None)
    p.add_argument("--lambda-tight", type=float, default=d.lambda_tight)
    p.add_argument("--tight-clamp-ratio", type=_optional_float, default=d.tight_clamp_ratio, help="a number or none")
    p.add_argument("--lambda-imle", type=float, default=d.lambda_imle)
    p.add_argument("--candidates", type=int, default=d.candidates, help="NAIGN: noise samples per data point")
    p.add_argument("--refresh-every", type=int, default=d.refresh_every,
                   help="NAIGN: steps between new pools of candidates")
    p.add_argument("--prior", default=d.prior, help="gaussian | fourier")
    p.add_argument("--step-mode", default=d.step_mode)
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", default=d.amp, help="auto | bf16 | none")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="run folder (default %(default)s)")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--sample-every", type=int, default=d.sample_every)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--max-nonfinite-steps", type=int, default=d.max_nonfinite_steps,
                   help="steps in a row with a non-finite loss (each skipped) before training stops")
    p.add_argument("--sync-batchnorm", action="store_true",
                   help="under torchrun: BatchNorm statistics over the global batch (needs --norm batch, CUDA)")


def cmd_train(args):
    from .trainer import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["progress"] = not args.no_progress
    config = TrainConfig(**values)
    trainer, summary = train(config, resume=args.resume)
    try:
        if trainer.dist.is_main:  # under torchrun only rank 0 writes and reports
            last = trainer.write_samples(os.path.join(config.out, "samples.png"))
            ranks = f" on {trainer.dist.world_size} ranks" if trainer.dist.enabled else ""
            print(f"trained {summary['steps']} steps{ranks} in {summary['seconds']:.0f} s; run folder: {config.out}")
            if summary["nonfinite_steps"]:
                print(f"skipped {summary['nonfinite_steps']} steps with a non-finite loss")
            if trainer.data.dim() == 4:
                print(f"samples: {last}")
    finally:
        trainer.close()
    return 0


def _load(args):
    from .inference import load_trained
    from .trainer import resolve_device

    device = resolve_device(args.device)
    model, prior, meta = load_trained(args.checkpoint, device)
    return model, prior, meta, device


def cmd_sample(args):
    from safetensors.torch import save_file

    from .images import hstack, image_grid, save_array_png
    from .inference import apply_f

    model, prior, meta, device = _load(args)
    if args.n <= 0 or args.steps <= 0:
        raise UsageError("--n and --steps must be positive integers")
    z = prior.sample(args.n, generator=torch.Generator().manual_seed(args.seed)).to(device)
    fz = apply_f(model, z, 1)
    ffz = apply_f(model, fz, 1)
    fnz = apply_f(model, z, args.steps)
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(meta_folder(args.checkpoint))), "sample")
    os.makedirs(out, exist_ok=True)
    save_file({"z": z.cpu().contiguous(), "f_z": fz.cpu().contiguous(), "ff_z": ffz.cpu().contiguous(),
               f"f{args.steps}_z": fnz.cpu().contiguous()}, os.path.join(out, "samples.safetensors"))
    if fz.dim() == 4:
        nrow = max(1, int(args.n ** 0.5))
        grid = hstack([image_grid(t.float().cpu(), nrow=nrow) for t in (fz, ffz, fnz)])
        path = save_array_png(grid, os.path.join(out, "samples.png"))
        print(f"f(z) | f(f(z)) | f^{args.steps}(z): {path}")
    print(f"tensors: {os.path.join(out, 'samples.safetensors')}")
    return 0


def meta_folder(path):
    from .checkpoint import resolve_checkpoint

    return resolve_checkpoint(path)


def corrupt(images, kind, generator, noise_std=0.5):
    """Held-out digits made off-manifold: gaussian noise, a masked square, or a sketch-like edge map."""
    if kind == "noise":
        noise = torch.randn(images.shape, generator=generator)
        return (images + noise_std * noise).clamp(-1, 1)
    if kind == "mask":
        out = images.clone()
        h, w = images.shape[-2:]
        size = h // 2
        for i in range(images.shape[0]):
            top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
            out[i, :, top:top + size, left:left + size] = -1.0
        return out
    if kind == "sketch":
        gray = images.mean(dim=1, keepdim=True)
        kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
        gx = torch.nn.functional.conv2d(gray, kx, padding=1)
        gy = torch.nn.functional.conv2d(gray, kx.transpose(2, 3), padding=1)
        edges = (gx.square() + gy.square()).sqrt()
        edges = (edges / edges.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6) > 0.35).float()
        return (edges * 2 - 1).expand_as(images).contiguous()
    raise UsageError(f"--corruption must be noise, mask or sketch; got {kind!r}")


def psnr(a, b, peak_to_peak=2.0):
    mse = (a.float() - b.float()).square().flatten(1).mean(1).clamp_min(1e-12)
    return (10 * torch.log10(peak_to_peak ** 2 / mse)).mean().item()


def cmd_project(args):
    from .data import load_mnist5k
    from .images import image_grid, load_png, save_array_png, save_png, vstack
    from .inference import apply_f

    model, prior, meta, device = _load(args)
    if args.steps <= 0 or args.n <= 0:
        raise UsageError("--n and --steps must be positive integers")
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(meta_folder(args.checkpoint))), "project")
    os.makedirs(out, exist_ok=True)
    shape = tuple(prior.shape)
    if args.images:
        channels, size = shape[0], shape[-1]
        batch = torch.cat([load_png(p, size=size, channels=channels) for p in args.images]).to(device)
        projected = apply_f(model, batch, args.steps)
        for p, y in zip(args.images, projected):
            target = os.path.join(out, os.path.splitext(os.path.basename(p))[0] + "_projected.png")
            save_png(y, target)
            print(f"{p} -> {target}")
        return 0
    if shape != (1, 28, 28):
        raise UsageError(f"projecting held-out MNIST-5k needs a 1x28x28 model; this one takes {shape}: "
                         "pass image files instead")
    clean, _ = load_mnist5k("test")
    clean = clean[: args.n]
    corrupted = corrupt(clean, args.corruption, torch.Generator().manual_seed(args.seed))
    projected = apply_f(model, corrupted.to(device), args.steps).cpu()
    before, after = psnr(corrupted, clean), psnr(projected, clean)
    grid = vstack([image_grid(t[:16], nrow=16) for t in (clean, corrupted, projected)])
    path = save_array_png(grid, os.path.join(out, f"project_{args.corruption}.png"))
    print(f"{args.corruption}: PSNR to clean digits {before:.2f} dB before, {after:.2f} dB after f^{args.steps} "
          f"({args.n} held-out digits)")
    print(f"clean / corrupted / projected: {path}")
    return 0


def cmd_eval(args):
    from . import metrics
    from .inference import apply_f

    model, prior, meta, device = _load(args)
    if tuple(prior.shape) != (1, 28, 28):
        raise UsageError("eval measures digit models (1x28x28); this checkpoint's data has shape "
                         f"{tuple(prior.shape)}")
    gen = torch.Generator().manual_seed(args.seed)

    def generate_fn(n):
        return apply_f(model, prior.sample(n, generator=gen).to(device), args.steps).cpu()

    report = metrics.evaluate_digits(generate_fn, n=args.n)
    print(json.dumps(report, indent=2, default=float))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2, default=float)
    return 0


def cmd_ood(args):
    from .data import load_mnist5k
    from .manifold import ood_report

    model, prior, meta, device = _load(args)
    if tuple(prior.shape) != (1, 28, 28):
        raise UsageError("ood compares against held-out MNIST-5k digits; this checkpoint is not a digit model")
    heldout, _ = load_mnist5k("test")
    report = ood_report(model, heldout.to(device), generator=torch.Generator().manual_seed(args.seed))
    for name, value in report.items():
        print(f"AUROC held-out digits vs {name}: {value:.4f}")
    return 0


def cmd_export(args):
    from .export import export_projector
    from .inference import load_trained

    model, prior, meta = load_trained(args.checkpoint, "cpu")
    written = export_projector(model, args.out, steps=args.steps, format=args.format,
                               prior=None if args.no_prior else prior)
    for path in written:
        print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- restore (issue 13)
# Self-contained: the subcommand's parser, its command and its helpers; build_parser and COMMANDS name them once.
RESTORE_CORRUPTIONS = ("mask", "gray", "down", "noise", "sketch")


def _add_restore(sub):
    p = _add_checkpoint_command(sub, "restore", "undo a known corruption (mask, gray, down, noise, sketch) with f "
                                                "and the measurement operator; PSNR/SSIM before and after")
    p.add_argument("--corruption", required=True, help=" | ".join(RESTORE_CORRUPTIONS))
    p.add_argument("--method", default="auto", help="auto | project | consistent | latent (default %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="f applications, alternations or Adam iterations")
    p.add_argument("--starts", type=int, default=None, help="latent: starts per image")
    p.add_argument("--n", type=int, default=256, help="held-out digits (without --images)")
    p.add_argument("--factor", type=int, default=2, help="down: the downsampling factor")
    p.add_argument("--noise-std", type=float, default=0.5, help="noise: its standard deviation in [-1, 1] units")
    p.add_argument("--images", nargs="*", default=None, help="PNG/JPEG files to corrupt and restore instead "
                                                             "(resized to the model's size)")
    p.add_argument("--out", default=None)


def _restore_problem(kind, clean, generator, factor, noise_std):
    """(operator, measurements y) for the named corruption of clean images."""
    from .operators import Downsample, Edges, Grayscale, Identity, Mask, random_square_mask

    if kind == "mask":
        op = Mask(random_square_mask(clean.shape[0], clean.shape[-1], channels=clean.shape[1],
                                     generator=generator))
        return op, op.A(clean)
    if kind == "gray":
        if clean.shape[1] != 3:
            raise UsageError(f"--corruption gray needs a colour (3-channel) model; this one has {clean.shape[1]}")
        return Grayscale(), Grayscale().A(clean)
    if kind == "down":
        if factor < 1 or clean.shape[-1] % factor or clean.shape[-2] % factor:
            raise UsageError(f"--factor must be a positive divisor of the image size {clean.shape[-1]}, got {factor}")
        return Downsample(factor), Downsample(factor).A(clean)
    if kind == "noise":
        if not noise_std > 0:
            raise UsageError(f"--noise-std must be > 0, got {noise_std}")
        noisy = (clean + noise_std * torch.randn(clean.shape, generator=generator)).clamp(-1, 1)
        return Identity(noise_std), noisy
    if kind == "sketch":
        return Edges(), Edges().hard(clean)
    raise UsageError(f"--corruption must be one of {', '.join(RESTORE_CORRUPTIONS)}; got {kind!r}")


def ssim_or_none(a, b):
    """Mean SSIM of images in [-1, 1] with pytorch-msssim (the optional extra `restore`), or None without it."""
    try:
        from pytorch_msssim import ssim
    except ImportError:
        return None
    win = min(11, min(a.shape[-2:]) - (1 - min(a.shape[-2:]) % 2))  # odd and no larger than the image
    return float(ssim((a.float().clamp(-1, 1) + 1) / 2, (b.float().clamp(-1, 1) + 1) / 2, data_range=1.0,
                      win_size=max(win, 3)))


def cmd_restore(args):
    import time

    from .data import load_mnist5k
    from .images import image_grid, load_png, save_array_png, save_png, vstack
    from .inference import Projector
    from .restore import METHODS

    if args.corruption not in RESTORE_CORRUPTIONS:
        raise UsageError(f"--corruption must be one of {', '.join(RESTORE_CORRUPTIONS)}; got {args.corruption!r}")
    if args.method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}; got {args.method!r}")
    for name in ("steps", "starts"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name} must be a positive integer, got {value}")
    if args.n <= 0:
        raise UsageError(f"--n must be a positive integer, got {args.n}")
    from .trainer import resolve_device

    device = resolve_device(args.device)
    projector = Projector.load(args.checkpoint, device=device)
    shape = projector.input_shape
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(meta_folder(args.checkpoint))), "restore")
    if args.images:
        clean = torch.cat([load_png(p, size=shape[-1], channels=shape[0]) for p in args.images])
    else:
        if shape != (1, 28, 28):
            raise UsageError(f"restoring held-out MNIST-5k needs a 1x28x28 model; this one takes {shape}: "
                             "pass --images instead")
        clean = load_mnist5k("test")[0][: args.n]
    operator, y = _restore_problem(args.corruption, clean, torch.Generator().manual_seed(args.seed), args.factor,
                                   args.noise_std)
    corrupted = operator.initial(y)
    start = time.perf_counter()
    restored = projector.restore(y, operator, method=args.method, steps=args.steps, seed=args.seed,
                                 **({} if args.starts is None else {"starts": args.starts})).cpu()
    seconds = time.perf_counter() - start
    os.makedirs(out, exist_ok=True)
    tag = f"{args.corruption}_{args.method}"
    nrow = min(16, clean.shape[0])
    grid = vstack([image_grid(t[:nrow].expand(-1, shape[0], -1, -1), nrow=nrow)
                   for t in (clean, corrupted, restored)])
    path = save_array_png(grid, os.path.join(out, f"restore_{tag}.png"))
    if args.images:
        for p, x in zip(args.images, restored):
            target = os.path.join(out, os.path.splitext(os.path.basename(p))[0] + f"_restored_{tag}.png")
            save_png(x, target)
            print(f"{p} -> {target}")
    before, after = psnr(corrupted, clean), psnr(restored, clean)
    print(f"{args.corruption} ({operator!r}), method {args.method}: PSNR {before:.2f} dB before, {after:.2f} dB "
          f"after ({clean.shape[0]} images, {seconds:.1f} s)")
    ssim_before, ssim_after = ssim_or_none(corrupted, clean), ssim_or_none(restored, clean)
    if ssim_before is None:
        print("SSIM: not computed (pip install pytorch-msssim, or ign_fast[restore])")
    else:
        print(f"SSIM {ssim_before:.3f} before, {ssim_after:.3f} after")
    print(f"clean / corrupted / restored: {path}")
    return 0


def _add_checkpoint_command(sub, name, help_text):
    p = sub.add_parser(name, help=help_text)
    p.add_argument("checkpoint", help="run folder or checkpoint folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    return p


def build_parser():
    parser = argparse.ArgumentParser(prog="ign-fast", description="Idempotent generative networks, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    p = _add_checkpoint_command(sub, "sample", "f(z), f(f(z)) and f^n(z) as a PNG grid plus tensors")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None)
    p = _add_checkpoint_command(sub, "project", "project corrupted held-out digits (or image files) with f^n")
    p.add_argument("--corruption", default="noise", help="noise | mask | sketch")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--images", nargs="*", default=None,
                   help="PNG/JPEG files to project instead (resized to the model's size; grayscale files such as "
                        "sketches or scans are replicated to 3 channels for a colour model)")
    p.add_argument("--out", default=None)
    p = _add_checkpoint_command(sub, "eval", "digit FID, mode coverage, PRDC, novelty of generated digits")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    p = sub.add_parser("export", help="write f^N (and generation from the prior) as a torch-only file")
    p.add_argument("checkpoint", help="run folder or checkpoint folder")
    p.add_argument("--format", default="torchscript", help="torchscript | export | onnx (default %(default)s)")
    p.add_argument("--steps", type=int, default=1, help="N in f^N (default %(default)s)")
    p.add_argument("--out", required=True, help="file to write (.pt for torchscript, .pt2, .onnx)")
    p.add_argument("--no-prior", action="store_true", help="export the projector only, no generation")
    _add_checkpoint_command(sub, "ood", "AUROC of the drift score: held-out digits vs noise, inverted, rotated")
    _add_restore(sub)
    return parser


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "project": cmd_project, "eval": cmd_eval, "ood": cmd_ood,
            "export": cmd_export, "restore": cmd_restore}


def main(argv=None):
    from .checkpoint import CheckpointError
    from .step import NonFiniteUpdateError
    from .trainer import NonFiniteTrainingError

    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with one usage line on bad syntax
    try:
        return COMMANDS[args.command](args)
    except (NonFiniteTrainingError, NonFiniteUpdateError) as error:  # the run's data or settings, not usage
        print(f"ign-fast {args.command}: error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    except (UsageError, ValueError, TypeError, CheckpointError, FileNotFoundError, ImportError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"ign-fast {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"ign-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
