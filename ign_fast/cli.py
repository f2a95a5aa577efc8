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
    _add_train_arguments(sub.add_parser("train", help="train on a data set (default: NAIGN on MNIST-5k)"))


def _add_train_arguments(p):
    from .trainer import TrainConfig

    d = TrainConfig()
    p.add_argument("--objective", default=d.objective, help="ign | naign (default %(default)s)")
    p.add_argument("--data", default=d.data,
                   help="mnist5k | mnist5k-color | mnist | images | trimodal | 8gaussians | moons | rings "
                        "(default %(default)s)")
    p.add_argument("--data-root", default=None, help="folder for --data mnist (IDX files) or images")
    p.add_argument("--image-size", type=int, default=None, help="resize for --data images")
    p.add_argument("--model", default=d.model,
                   help="dcgan28 | dcgan64 | mlp | unet, or your own as MODULE:ATTR (a class or, with "
                        "--trust-model-code, a factory; MODULE importable, e.g. on PYTHONPATH) (default %(default)s)")
    p.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help="keyword arguments of the model as a JSON object, e.g. '{\"width\": 64}' (recorded in "
                        "checkpoints to rebuild it; for unet: depth, blocks)")
    p.add_argument("--trust-model-code", action="store_true",
                   help="let --model name a factory function, not only an nn.Module class")
    p.add_argument("--ema-decay", type=_optional_float, default=d.ema_decay,
                   help="keep an exponential moving average of the weights with this decay, which sampling, "
                        "projection, evaluation and export use; none turns it off (default %(default)s)")
    p.add_argument("--num-workers", type=int, default=d.num_workers,
                   help="processes decoding images for --data images (default %(default)s)")
    p.add_argument("--norm", default=d.norm, help="batch | group | none (default %(default)s)")
    p.add_argument("--latent-dim", type=int, default=d.latent_dim,
                   help="channels of the model's bottleneck (default %(default)s)")
    p.add_argument("--width", type=int, default=d.width, help="base channel count of the model (default %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="total training steps to reach; with --resume the run continues up to this step count, "
                        "not this many more (default 2000; 6000 for naign on the toy sets)")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 (ign) or 64 (naign)")
    p.add_argument("--lr", type=float, default=None, help="default 1e-4 (ign), 5e-4 (naign), 2e-3 (naign on toy sets)")
    p.add_argument("--lr-schedule", default=d.lr_schedule,
                   help="constant | cosine (a half cosine from --lr to 0 over --steps; default %(default)s)")
    p.add_argument("--beta1", type=float, default=d.beta1,
                   help="Adam's first-moment decay, in [0, 1) (default %(default)s, the IGN paper's)")
    p.add_argument("--beta2", type=float, default=d.beta2,
                   help="Adam's second-moment decay, in [0, 1) (default %(default)s)")
    p.add_argument("--distance", default=d.distance, help="l1 | l2 (default %(default)s)")
    p.add_argument("--lambda-rec", type=float, default=None, help="weight of f(x) = x; default 20 (ign) or 1 (naign)")
    p.add_argument("--lambda-idem", type=float, default=None,
                   help="weight of f(f(z)) = f(z); default 20 (ign), 0 (naign), 1 (naign on toy sets)")
    p.add_argument("--lambda-tight", type=float, default=None,
                   help="weight of the tightness term: default 2.5 (ign), 0 (naign; > 0 adds it on the pulled "
                        "samples, an IGN + IMLE hybrid, docs/IGN.md)")
    p.add_argument("--tight-clamp-ratio", type=_optional_float, default=d.tight_clamp_ratio, help="a number or none")
    p.add_argument("--tight-warmup", type=int, default=d.tight_warmup,
                   help="steps over which the tightness weight rises from 0 to --lambda-tight (default "
                        "%(default)s: off)")
    p.add_argument("--tight-warmup-shape", default=d.tight_warmup_shape,
                   help="linear | exp (1 - exp(-5 step/N)); default %(default)s")
    p.add_argument("--lambda-imle", type=float, default=None,
                   help="weight of the IMLE pull: NAIGN's term (default 1); with --objective ign every image pulls "
                        "the nearest f(z) of its batch, an IGN + IMLE hybrid (default 0: the paper's objective; "
                        "docs/IGN.md)")
    p.add_argument("--candidates", type=int, default=d.candidates, help="NAIGN: noise samples per data point")
    p.add_argument("--lambda-restore", type=float, default=d.lambda_restore,
                   help="weight of d(f(c(x)), x), teaching f to undo corruptions c (default %(default)s: off)")
    p.add_argument("--restore-corruptions", default=d.restore_corruptions,
                   help="with --lambda-restore: comma-separated mask, noise, gray (gray: RGB data only; "
                        "default %(default)s)")
    p.add_argument("--restore-distance", default=d.restore_distance,
                   help="with --lambda-restore: l1 | l2, the term's distance (default: --distance)")
    p.add_argument("--restore-mask-fill", type=float, default=d.restore_mask_fill,
                   help="with --lambda-restore: the value of a masked square's pixels, in [-1, 1]; restore feeds f "
                        "the same (Mask(known, fill=...)); default %(default)s, mid-gray, not the black background")
    p.add_argument("--refresh-every", type=int, default=d.refresh_every,
                   help="NAIGN: steps between new pools of candidates")
    p.add_argument("--prior", default=d.prior,
                   help="gaussian | fourier | mixture (a mixture of Gaussians fitted to the data: k-means clusters, "
                        "each with its top principal directions; docs/NAIGN.md) (default %(default)s)")
    p.add_argument("--sample-prior", default=d.sample_prior,
                   help="the prior samples are drawn from (the grids here; ign-fast sample, eval, export), when it "
                        "is not --prior: mixture trains from noise and generates from the data's mixture, about 3x "
                        "lower digit FID (docs/NAIGN.md) (default: --prior)")
    p.add_argument("--prior-components", type=int, default=d.prior_components,
                   help="a mixture prior: clusters of the data (default %(default)s)")
    p.add_argument("--prior-rank", type=int, default=d.prior_rank,
                   help="a mixture prior: principal directions kept per cluster (default %(default)s)")
    p.add_argument("--step-mode", default=d.step_mode,
                   help="auto | reference | fused | graph (default auto: fused; graph, the whole update as one CUDA "
                        "graph, is opt-in until it has passed on a GPU)")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N (default auto: cuda if available)")
    p.add_argument("--amp", default=d.amp, help="auto | bf16 | none")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the weights, data order and noise "
                                                             "(default %(default)s)")
    p.add_argument("--out", default=d.out, help="run folder (default %(default)s); must be empty or absent for a "
                                                 "new run")
    p.add_argument("--log-every", type=int, default=d.log_every,
                   help="steps between rows of metrics.csv and, when not on a terminal, log lines")
    p.add_argument("--sample-every", type=int, default=d.sample_every, help="steps between sample grids")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint, with its saved settings (options "
                        "written out change them from there on)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a --out that holds one: its checkpoints, samples, metrics and config "
                        "are deleted first")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a plain line every --log-every steps instead")
    p.add_argument("--max-nonfinite-steps", type=int, default=d.max_nonfinite_steps,
                   help="steps in a row with a non-finite loss (each skipped) before training stops")
    p.add_argument("--sync-batchnorm", action="store_true",
                   help="under torchrun: BatchNorm statistics over the global batch (needs --norm batch, CUDA)")
    p.add_argument("--conditional", action="store_true",
                   help="class-conditional f: the label as one-hot input planes; sample with --labels (needs "
                        "labelled data: mnist5k, mnist; docs/CONDITIONAL.md)")


def given_train_options(argv):
    """The train options `argv` (what follows "train") writes out, as TrainConfig field names; one given at its
    default value counts. argparse sets an option's default only where the namespace lacks the attribute, so
    parsing into a namespace of markers leaves a marker wherever no option was written."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_train_arguments(parser)
    marker = object()
    namespace = argparse.Namespace(**{a.dest: marker for a in parser._actions})
    parser.parse_known_args(argv, namespace)
    return {dest for dest, value in vars(namespace).items() if value is not marker}


def saved_run_settings(out):
    """The config the latest checkpoint in the run folder `out` was trained with, or {} where it holds none
    (a resume that starts a fresh run). CheckpointError (one line) when its meta.json is unreadable."""
    from .checkpoint import CheckpointError, read_meta, resolve_checkpoint

    try:
        folder = resolve_checkpoint(out)
    except CheckpointError:
        return {}
    config = read_meta(folder).get("config")
    return config if isinstance(config, dict) else {}


# Read from the command line at every call, never from the saved run: where to write, how to show progress,
# and the opt-in to run a checkpoint's factory function (a run folder from elsewhere must not turn it on).
NOT_RESUMED = ("out", "progress", "trust_model_code")


def cmd_train(args):
    from .trainer import TrainConfig, format_seconds, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["progress"] = "lines" if args.no_progress else "auto"
    if args.model_kwargs is not None:
        from .model_record import parse_kwargs_json

        values["model_kwargs"] = parse_kwargs_json(args.model_kwargs)
    if args.resume:  # the run goes on as it was trained: what the command line leaves out is the saved run's
        given = getattr(args, "given", None)
        given = set(values) if given is None else given
        for field, value in saved_run_settings(args.out).items():
            if field in fields and field not in given and field not in NOT_RESUMED:
                values[field] = value
    config = TrainConfig(**values)
    trainer, summary = train(config, resume=args.resume, overwrite=args.overwrite)
    try:
        if trainer.dist.is_main:  # under torchrun only rank 0 writes and reports
            done, start, target = summary["steps"], summary["start_step"], summary["target"]
            if done == start:  # --steps is a total: a resumed run may already be there, or past it
                where = "past" if done > target else "at"
                print(f"nothing to train: the run in {config.out} is already at step {done}, {where} --steps "
                      f"{target} (the total to reach); pass --steps above {done} to continue it")
                return 0
            last = trainer.write_samples(os.path.join(config.out, "samples.png"))
            ranks = f" on {trainer.dist.world_size} ranks" if trainer.dist.enabled else ""
            span = f"steps {start + 1}-{done}" if start else f"to step {done}"
            print(f"trained {done - start} steps ({span}){ranks} in {format_seconds(summary['seconds'])}; "
                  f"run folder: {config.out}")
            if summary["nonfinite_steps"]:
                print(f"skipped {summary['nonfinite_steps']} steps with a non-finite loss")
            if len(trainer.sample_shape) == 3:
                print(f"samples: {last}")
    finally:
        trainer.close()
    return 0


def _load(args):
    from .inference import load_trained
    from .trainer import resolve_device

    device = resolve_device(args.device)
    model, prior, meta = load_trained(args.checkpoint, device, trust_model_code=args.trust_model_code,
                                      ema=not args.no_ema, training_prior=getattr(args, "training_prior", False))
    return model, prior, meta, device


def _num_classes(model):
    """K for a class-conditional model (ign_fast.conditional.LabelConditioned), else None."""
    from .conditional import LabelConditioned

    return model.num_classes if isinstance(model, LabelConditioned) else None


def parse_labels(text, num_classes, flag="--labels"):
    """'0,1,2' -> [0, 1, 2] for a K-class run, or a UsageError naming the flag; None when text is None."""
    if text is None:
        return None
    if num_classes is None:
        raise UsageError(f"{flag} is for class-conditional runs (trained with --conditional); this one is "
                         "unconditional")
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or not all(p.lstrip("-").isdigit() for p in parts):
        raise UsageError(f"{flag} must be comma-separated class indices in 0..{num_classes - 1}, e.g. 0,1,2; "
                         f"got {text!r}")
    labels = [int(p) for p in parts]
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise UsageError(f"{flag} must be class indices in 0..{num_classes - 1} for this {num_classes}-class run, "
                         f"got {bad[0]}")
    return labels


def _apply(model, y, steps, labels):
    """f^steps(y) under the inference policy; for a conditional model with the labels' planes held fixed."""
    from .conditional import apply_conditioned
    from .inference import apply_f

    if labels is None:
        return apply_f(model, y, steps)
    return apply_conditioned(model, y, labels, steps)


def _refuse_conditional(model, command, instead):
    if _num_classes(model) is not None:
        raise UsageError(f"{command} is not available for a class-conditional run (trained with --conditional); "
                         f"{instead}")


def _check_positive(flag, value, minimum=1):
    if value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise UsageError(f"{flag} must be {expected}, got {value}")


def default_output(checkpoint, name):
    """<run>/<name> for a checkpoint inside <run>/checkpoints/ (or the run folder itself); for a step folder
    kept elsewhere, <name> beside it: never inside a checkpoint, never above the folder the user pointed at."""
    from .checkpoint import resolve_checkpoint

    folder = os.path.abspath(resolve_checkpoint(checkpoint))
    parent = os.path.dirname(folder)
    run = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent
    return os.path.join(run, name)


def cmd_sample(args):
    from safetensors.torch import save_file

    from .checkpoint import resolve_checkpoint
    from .images import hstack, image_grid, save_array_png

    _check_positive("--n", args.n)
    _check_positive("--steps", args.steps)
    model, prior, meta, device = _load(args)
    num_classes = _num_classes(model)
    requested = parse_labels(args.labels, num_classes)
    labels = None
    if num_classes is not None:  # the listed classes (default: every class) repeated to --n samples
        requested = requested or list(range(num_classes))
        labels = torch.tensor(requested, dtype=torch.int64).repeat(-(-args.n // len(requested)))[:args.n]
    z = prior.sample(args.n, generator=torch.Generator().manual_seed(args.seed)).to(device)
    fz = _apply(model, z, 1, labels)
    ffz = _apply(model, fz, 1, labels)
    fnz = _apply(model, z, args.steps, labels)
    # beside the grids the trainer writes (samples/step_*.png), named by the checkpoint that made them
    out = args.out or default_output(args.checkpoint, "samples")
    stem = "sample_" + os.path.basename(os.path.normpath(resolve_checkpoint(args.checkpoint)))
    os.makedirs(out, exist_ok=True)
    tensors = os.path.join(out, stem + ".safetensors")
    saved = {"z": z.cpu().contiguous(), "f_z": fz.cpu().contiguous(), "ff_z": ffz.cpu().contiguous(),
             f"f{args.steps}_z": fnz.cpu().contiguous()}
    if labels is not None:
        saved["labels"] = labels.contiguous()
    save_file(saved, tensors)
    if fz.dim() == 4:
        nrow = max(1, int(args.n ** 0.5))
        if labels is not None and 1 < len(requested) <= args.n:  # one column per requested label
            nrow = len(requested)
        grid = hstack([image_grid(t.float().cpu(), nrow=nrow) for t in (fz, ffz, fnz)])
        path = save_array_png(grid, os.path.join(out, stem + ".png"))
        print(f"f(z) | f(f(z)) | f^{args.steps}(z): {path}")
    print(f"tensors: {tensors}")
    return 0


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


MSE_FLOOR = 1e-12  # an exact image scores 10 log10(4 / 1e-12) = 126 dB on [-1, 1], not infinity


def _psnr_of_mse(mse, peak_to_peak):
    return 10 * torch.log10(peak_to_peak ** 2 / mse.clamp_min(MSE_FLOOR))


def per_image_psnr(a, b, peak_to_peak=2.0):
    """[B]: each image's PSNR, its MSE floored at MSE_FLOOR."""
    return _psnr_of_mse((a.float() - b.float()).square().flatten(1).mean(1), peak_to_peak)


def psnr(a, b, peak_to_peak=2.0):
    """The mean over images of each image's PSNR (126 dB for an exact image)."""
    return per_image_psnr(a, b, peak_to_peak).mean().item()


def pooled_psnr(a, b, peak_to_peak=2.0):
    """The PSNR of the mean squared error over every pixel of every image (torchmetrics' default reduction)."""
    return _psnr_of_mse((a.float() - b.float()).square().mean(), peak_to_peak).item()


def restoration_scores(restored, corrupted, clean):
    """PSNR before and after three ways, since they disagree where the corruption leaves some images exact (a
    square on empty background): every image's PSNR averaged (`psnr`: such an image scores the 126 dB floor
    before, which a restoration that moves any of its pixels cannot keep), the same over the images the
    corruption changed, and pooled over all pixels."""
    before, after = per_image_psnr(corrupted, clean), per_image_psnr(restored, clean)
    changed = (corrupted.float() != clean.float()).flatten(1).any(1)
    scores = {"images": int(clean.shape[0]), "changed": int(changed.sum()),
              "before": before.mean().item(), "after": after.mean().item(),
              "pooled_before": pooled_psnr(corrupted, clean), "pooled_after": pooled_psnr(restored, clean)}
    if changed.any():
        scores["changed_before"] = before[changed].mean().item()
        scores["changed_after"] = after[changed].mean().item()
    return scores


def projected_names(paths):
    """<stem>_projected.png per input; inputs that share a stem (seven.png, seven.jpg) keep their extension in
    the name (seven_png_projected.png), so no output overwrites another. Same file names from different
    folders cannot be told apart that way: UsageError."""
    stems = [os.path.splitext(os.path.basename(p)) for p in paths]
    counts = {}
    for stem, _ in stems:
        counts[stem] = counts.get(stem, 0) + 1
    names = [f"{stem}{'_' + ext.lstrip('.') if counts[stem] > 1 and ext else ''}_projected.png"
             for stem, ext in stems]
    seen = {}
    for path, name in zip(paths, names):
        if name in seen:
            raise UsageError(f"--images: {seen[name]!r} and {path!r} would both be written as {name}: rename one "
                             "or project them separately")
        seen[name] = path
    return names


def _should_invert(image, background, how):
    """Whether to invert one loaded image: --invert yes/no, or auto: when its border (the paper) is on the
    other side of mid-grey from the training data's background, e.g. a dark-on-white scan for a digit model."""
    from .images import border_mean

    if how != "auto":
        return how == "yes"
    if background is None:
        return False
    paper = float(border_mean(image)[0])
    return paper * background < 0 and abs(paper) > 0.25 and abs(background) > 0.25


def _data_background(model, prior, meta, device):
    """The training data's border brightness, from the checkpoint or, for an older one, from generated images."""
    from .images import border_mean
    from .inference import apply_f

    if meta.get("data_border_mean") is not None:
        return float(meta["data_border_mean"])
    z = prior.sample(16, generator=torch.Generator().manual_seed(0)).to(device)
    return float(border_mean(apply_f(model, z, 1).cpu()).mean())


def cmd_project(args):
    from .data import load_mnist5k
    from .images import image_grid, load_png, save_array_png, save_png, vstack

    _check_positive("--n", args.n)
    _check_positive("--steps", args.steps)
    if args.invert not in ("auto", "yes", "no"):
        raise UsageError(f"--invert must be auto, yes or no; got {args.invert!r}")
    if args.images is None and args.corruption not in ("noise", "mask", "sketch"):
        raise UsageError(f"--corruption must be noise, mask or sketch; got {args.corruption!r}")
    model, prior, meta, device = _load(args)
    shape = tuple(prior.shape)
    num_classes = _num_classes(model)
    given_labels = parse_labels(args.labels, num_classes)
    if args.images is not None:
        if len(shape) != 3:
            raise UsageError(f"--images needs an image model; this one takes vectors of shape {shape}")
        names = projected_names(args.images)
        channels, size = shape[0], shape[-1]
        images = []
        for p in args.images:
            try:
                images.append(load_png(p, size=size, channels=channels))
            except ValueError as error:
                raise UsageError(f"--images: {error}") from None
        background = _data_background(model, prior, meta, device) if args.invert == "auto" else None
        inverted = [_should_invert(image, background, args.invert) for image in images]
        batch = torch.cat([-image if flip else image for image, flip in zip(images, inverted)]).to(device)
        labels = None
        if num_classes is not None:  # the class each image is projected onto: one for all, or one per image
            if given_labels is None or len(given_labels) not in (1, len(images)):
                raise UsageError(f"--labels must give one class (in 0..{num_classes - 1}) for all --images or one "
                                 f"per image ({len(images)}) for a class-conditional run")
            labels = torch.tensor(given_labels * (len(images) if len(given_labels) == 1 else 1))
        projected = _apply(model, batch, args.steps, labels)
        out = args.out or default_output(args.checkpoint, "project")
        os.makedirs(out, exist_ok=True)
        for p, name, flip, y in zip(args.images, names, inverted, projected):
            target = save_png(y, os.path.join(out, name))
            print(f"{p} -> {target}{' (inverted first: dark on light)' if flip else ''}")
        return 0
    if shape != (1, 28, 28):
        raise UsageError(f"projecting held-out MNIST-5k needs a 1x28x28 model; this one takes {shape}: "
                         "pass image files with --images instead")
    if given_labels is not None:
        raise UsageError("--labels is for --images; held-out digits are projected onto their own classes")
    clean, clean_labels = load_mnist5k("test")
    clean, clean_labels = clean[: args.n], clean_labels[: args.n]
    corrupted = corrupt(clean, args.corruption, torch.Generator().manual_seed(args.seed))
    # a conditional run projects each held-out digit onto its own class (its label from the data set)
    projected = _apply(model, corrupted.to(device), args.steps,
                       clean_labels if num_classes is not None else None).cpu()
    before, after = psnr(corrupted, clean), psnr(projected, clean)
    out = args.out or default_output(args.checkpoint, "project")
    grid = vstack([image_grid(t[:16], nrow=16) for t in (clean, corrupted, projected)])
    path = save_array_png(grid, os.path.join(out, f"project_{args.corruption}.png"))
    print(f"{args.corruption}: PSNR to clean digits {before:.2f} dB before, {after:.2f} dB after f^{args.steps} "
          f"({len(clean)} held-out digits)")
    print(f"clean / corrupted / projected: {path}")
    return 0


def cmd_eval(args):
    from . import metrics

    _check_positive("--n", args.n, 6)  # PRDC compares each sample with its 5 nearest neighbours
    _check_positive("--steps", args.steps)
    model, prior, meta, device = _load(args)
    if tuple(prior.shape) != (1, 28, 28):
        raise UsageError("eval measures digit models (1x28x28); this checkpoint's data has shape "
                         f"{tuple(prior.shape)}: for other images, ign_fast.metrics.inception_fid(samples, "
                         "images) gives Inception FID (with torchmetrics or clean-fid), and `ign-fast restore RUN "
                         "--images ...` PSNR and SSIM")
    gen = torch.Generator().manual_seed(args.seed)
    num_classes = _num_classes(model)
    requested = None
    if num_classes is not None:  # every class equally often: 0, 1, ..., K-1, 0, ...; accuracy per class
        from .conditional import cycling_labels

        if num_classes != metrics.NUM_DIGIT_CLASSES:
            raise UsageError(f"eval judges digits with the package's {metrics.NUM_DIGIT_CLASSES}-class classifier; "
                             f"this conditional run has {num_classes} classes")
        requested = cycling_labels(args.n, num_classes)
    done = [0]

    def generate_fn(n):
        labels = None if requested is None else requested[done[0]:done[0] + n]
        done[0] += n
        return _apply(model, prior.sample(n, generator=gen).to(device), args.steps, labels).cpu()

    report = metrics.evaluate_digits(generate_fn, n=args.n, requested_labels=requested)
    print(json.dumps(report, indent=2, default=float))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2, default=float)
    return 0


def cmd_ood(args):
    from .data import load_mnist5k
    from .manifold import ood_report

    model, prior, meta, device = _load(args)
    _refuse_conditional(model, "ood", "its drift score needs a label per image")
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

    _check_positive("--steps", args.steps)
    model, prior, meta = load_trained(args.checkpoint, "cpu", trust_model_code=args.trust_model_code,
                                      training_prior=args.training_prior,
                                      ema=not args.no_ema)
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
    p.add_argument("--images", nargs="+", default=None, metavar="FILE",
                   help="PNG/JPEG files to corrupt and restore instead (short side resized to the model's size, "
                        "then center-cropped)")
    p.add_argument("--out", default=None, help="output folder (default: the run folder's restore/)")


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

    from .data import load_mnist5k, load_mnist5k_color
    from .images import image_grid, load_png, save_array_png, save_png, vstack
    from .inference import Projector
    from .restore import METHODS, auto_method

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
    projector = Projector.load(args.checkpoint, device=device, trust_model_code=args.trust_model_code,
                               ema=not args.no_ema)
    if projector.num_classes is not None:
        raise UsageError("restore is not available for a class-conditional run (trained with --conditional); use "
                         "ign-fast project --images FILE --labels CLASS")
    shape = projector.input_shape
    out = args.out or default_output(args.checkpoint, "restore")
    if args.images:
        clean = torch.cat([load_png(p, size=shape[-1], channels=shape[0]) for p in args.images])
    else:
        # the held-out digits of the package's data set of the model's shape: gray MNIST-5k, or the same digits
        # coloured by class (--data mnist5k-color), the RGB set colorization is measured on
        heldout = {(1, 28, 28): load_mnist5k, (3, 28, 28): load_mnist5k_color}
        if shape not in heldout:
            raise UsageError(f"restoring held-out digits needs a 1x28x28 (mnist5k) or 3x28x28 (mnist5k-color) "
                             f"model; this one takes {shape}: pass --images instead")
        clean = heldout[shape]("test")[0][: args.n]
    operator, y = _restore_problem(args.corruption, clean, torch.Generator().manual_seed(args.seed), args.factor,
                                   args.noise_std)
    # scored and shown as the benchmark defines it (a mask's square black), whatever restore feeds f
    corrupted = operator.corrupted_image(y)
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
    scores = restoration_scores(restored, corrupted, clean)
    before, after = scores["before"], scores["after"]
    method = args.method
    if method == "auto":  # say what auto ran: it depends on the operator and on what the run was trained to undo
        resolved, auto_steps = auto_method(operator, projector.taught)
        method = f"auto = {resolved}" + (f" x {auto_steps}" if auto_steps and args.steps is None else "")
    print(f"{args.corruption} ({operator!r}), method {method}: PSNR {before:.2f} dB before, {after:.2f} dB "
          f"after ({clean.shape[0]} images, {seconds:.1f} s)")
    if 0 < scores["changed"] < scores["images"]:
        print(f"{scores['images'] - scores['changed']} of {scores['images']} images are unchanged by the corruption "
              f"(126 dB before); on the other {scores['changed']}: {scores['changed_before']:.2f} dB before, "
              f"{scores['changed_after']:.2f} dB after")
    print(f"PSNR pooled over all pixels: {scores['pooled_before']:.2f} dB before, "
          f"{scores['pooled_after']:.2f} dB after")
    ssim_before, ssim_after = ssim_or_none(corrupted, clean), ssim_or_none(restored, clean)
    if ssim_before is None:
        print("SSIM: not computed (pip install pytorch-msssim, or ign_fast[restore])")
    else:
        print(f"SSIM {ssim_before:.3f} before, {ssim_after:.3f} after")
    print(f"clean / corrupted / restored: {path}")
    return 0


def _add_model_loading(p):
    p.add_argument("--trust-model-code", action="store_true",
                   help="rebuild a model whose checkpoint names a factory function (MODULE:ATTR), not a class")
    p.add_argument("--no-ema", action="store_true",
                   help="use the trained weights even where the run kept an EMA of them (default: the EMA)")


def _add_training_prior(p):
    p.add_argument("--training-prior", action="store_true",
                   help="draw z from the prior the run trained from, not from its --sample-prior (for a run "
                        "without one they are the same)")


def _add_checkpoint_command(sub, name, help_text):
    p = sub.add_parser(name, help=help_text)
    p.add_argument("checkpoint", help="run folder or checkpoint folder")
    _add_model_loading(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and corruptions drawn (default %(default)s)")
    return p


def build_parser():
    parser = argparse.ArgumentParser(prog="ign-fast", description="Idempotent generative networks, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_doctor(sub)
    _add_train(sub)
    p = _add_checkpoint_command(sub, "sample", "f(z), f(f(z)) and f^n(z) as a PNG grid plus tensors")
    p.add_argument("--n", type=int, default=64, help="number of noise samples z (default %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="n in f^n(z), the last column (default %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: the run folder's samples/)")
    p.add_argument("--labels", default=None, metavar="0,1,...",
                   help="class-conditional runs: the classes to draw, repeated to --n samples, one column each "
                        "(default: every class)")
    _add_training_prior(p)
    p = _add_checkpoint_command(sub, "project", "project corrupted held-out digits (or image files) with f^n")
    p.add_argument("--corruption", default="noise", help="noise | mask | sketch (default %(default)s)")
    p.add_argument("--n", type=int, default=500, help="held-out digits to corrupt and project (default %(default)s)")
    p.add_argument("--steps", type=int, default=1, help="n in f^n (default %(default)s)")
    p.add_argument("--images", nargs="+", default=None, metavar="FILE",
                   help="PNG/JPEG files to project instead (short side resized to the model's size, then "
                        "center-cropped, as in training; grayscale files such as sketches or scans are replicated "
                        "to 3 channels for a colour model)")
    p.add_argument("--invert", default="auto",
                   help="with --images: auto | yes | no (default auto: invert an image whose background is light "
                        "when the training data's is dark, e.g. a dark-on-white scan for a digit model)")
    p.add_argument("--out", default=None, help="output folder (default: the run folder's project/)")
    p.add_argument("--labels", default=None, metavar="0,1,...",
                   help="class-conditional runs with --images: the class to project onto, one for all images or "
                        "one per image (held-out digits use their own labels)")
    p = _add_checkpoint_command(sub, "eval", "digit FID, mode coverage, PRDC, novelty of generated digits (and, "
                                             "for a class-conditional run, the classifier's accuracy per class)")
    p.add_argument("--n", type=int, default=5000, help="digits to generate (default %(default)s)")
    p.add_argument("--steps", type=int, default=1, help="n in f^n(z) (default %(default)s)")
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    _add_training_prior(p)
    p = sub.add_parser("export", help="write f^N (and generation from the prior) as a torch-only file")
    p.add_argument("checkpoint", help="run folder or checkpoint folder")
    p.add_argument("--format", default="torchscript", help="torchscript | export | onnx (default %(default)s)")
    p.add_argument("--steps", type=int, default=1, help="N in f^N (default %(default)s)")
    p.add_argument("--out", required=True, help="file to write (.pt for torchscript, .pt2, .onnx)")
    p.add_argument("--no-prior", action="store_true", help="export the projector only, no generation")
    _add_training_prior(p)
    _add_model_loading(p)
    _add_checkpoint_command(sub, "ood", "AUROC of the drift score: held-out digits vs noise, inverted, rotated")
    _add_restore(sub)
    return parser


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "project": cmd_project, "eval": cmd_eval, "ood": cmd_ood,
            "export": cmd_export, "restore": cmd_restore}


def _add_doctor(sub):
    from .doctor import add_arguments

    add_arguments(sub.add_parser("doctor", help="build facts, then every op and step checked against the reference"))


def cmd_doctor(args):
    from .doctor import run

    return run(args)  # 1 on any mismatch; its usage errors are ValueErrors, which main reports with exit 2


COMMANDS["doctor"] = cmd_doctor


def main(argv=None):
    from .checkpoint import CheckpointError
    from .trainer import NonFiniteTrainingError

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)  # argparse itself exits 2 with one usage line on bad syntax
    if args.command == "train" and args.resume:  # what a resume takes from the saved run: the options not given
        args.given = given_train_options(argv[argv.index("train") + 1:])
    try:
        return COMMANDS[args.command](args)
    except NonFiniteTrainingError as error:  # the run's data or settings, not usage
        print(f"ign-fast {args.command}: error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return EXIT_TRAINING_FAILED
    except (UsageError, ValueError, TypeError, CheckpointError, OSError, ImportError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"ign-fast {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"ign-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
