"""Crash-safe checkpoints that never execute code when loaded.

A checkpoint is a folder `step_<N>/` inside `<run>/checkpoints/` holding
  model.safetensors   weights and buffers
  prior.safetensors   the noise prior's statistics (so sampling needs no data)
  optimizer.pt        optimizer state, read back with torch.load(weights_only=True)
  state.safetensors   random-number-generator states
  meta.json           run config, step, data-loader position, model record and prior config
  ema.safetensors     the exponential moving average of the weights, when the run keeps one (optional)
It is written into a temporary folder beside its final place, every file flushed and fsynced, then renamed
into place; `<run>/checkpoints/latest` is replaced last (temp file + os.replace), so a crash at any moment
leaves the previous checkpoint and pointer intact. The checkpoint just written and the `keep` - 1 before it
are kept (see _prune). Folders and files follow the user's umask, like any other file they write.
"""
import json
import os
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKPOINT_FILES = ("model.safetensors", "prior.safetensors", "optimizer.pt", "state.safetensors", "meta.json")
EMA_FILE = "ema.safetensors"  # optional: only runs with an EMA of the weights write it
# optional: only runs whose samples are drawn from another prior than training's (--sample-prior) write it
SAMPLE_PRIOR_FILE = "sample_prior.safetensors"
LATEST = "latest"
# Test-only: seconds to sleep after the files are written and before the rename, so a crash test's SIGKILL
# lands inside a save often (tests/test_crash_resume.py). Unset or 0 in normal use.
TEST_SAVE_DELAY_ENV = "IGN_FAST_TEST_SAVE_DELAY"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or not safe to load."""


def _umask():
    # read without changing it for good: os.umask only sets, returning the previous value
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path):
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path, text):
    """Replace path with text so that readers see the old content or the new, never a torn file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the user's umask decides, as for any file
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _test_delay():
    delay = os.environ.get(TEST_SAVE_DELAY_ENV)
    if delay:
        import time

        time.sleep(float(delay))


def _contiguous_state(tensors):
    # safetensors refuses shared or non-contiguous storage; a checkpoint owns plain copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_checkpoint(run_dir, step, *, model, optimizer, prior, meta, rng_states, keep=3, ema=None,
                    sample_prior=None):
    """Write checkpoint `step` atomically and return its folder. ema: the averaged weights (a state dict), or
    None. sample_prior: the prior generation draws from when it is not the training prior, or None."""
    ckpt_root = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckpt_root, exist_ok=True)
    name = f"step_{step:08d}"
    final = os.path.join(ckpt_root, name)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=ckpt_root)
    try:
        # mkdtemp makes 0700: others sharing the machine could not read a run; the user's umask decides
        os.chmod(tmp, 0o777 & ~_umask())
        save_file(_contiguous_state(model.state_dict()), os.path.join(tmp, "model.safetensors"))
        save_file(_contiguous_state(prior.state_dict()) or {"_empty": torch.zeros(0)},
                  os.path.join(tmp, "prior.safetensors"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        save_file(_contiguous_state(rng_states), os.path.join(tmp, "state.safetensors"))
        written = list(CHECKPOINT_FILES)
        if ema is not None:
            save_file(_contiguous_state(ema), os.path.join(tmp, EMA_FILE))
            written.append(EMA_FILE)
        if sample_prior is not None:
            save_file(_contiguous_state(sample_prior.state_dict()) or {"_empty": torch.zeros(0)},
                      os.path.join(tmp, SAMPLE_PRIOR_FILE))
            written.append(SAMPLE_PRIOR_FILE)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(dict(meta, step=step, format_version=1), f, indent=2, sort_keys=True)
        file_mode = 0o666 & ~_umask()  # safetensors writes 0600 whatever the umask
        for filename in written:
            os.chmod(os.path.join(tmp, filename), file_mode)
            _fsync_file(os.path.join(tmp, filename))
        _fsync_dir(tmp)
        _test_delay()
        if os.path.exists(final):  # re-saving the same step (e.g. after resume): move the old one aside first
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(os.path.join(ckpt_root, LATEST), name + "\n")
    _prune(ckpt_root, keep, name)
    return final


def _complete_checkpoints(ckpt_root):
    names = sorted(n for n in os.listdir(ckpt_root) if n.startswith("step_")
                   and all(os.path.exists(os.path.join(ckpt_root, n, f)) for f in CHECKPOINT_FILES))
    return names


def _prune(ckpt_root, keep, written):
    """Keep `written` (what `latest` now names) and the keep - 1 newest checkpoints before it. Checkpoints
    with higher step numbers belong to another history (a run that went further before this one was
    resumed from an earlier point): they are not this run's to judge and are left alone, and the one just
    written is never deleted, so `latest` cannot dangle."""
    older = [n for n in _complete_checkpoints(ckpt_root) if n < written]
    for old in older[:max(0, len(older) - (keep - 1))] if keep > 0 else []:
        shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
    for stale in os.listdir(ckpt_root):  # temporary folders of saves that a crash interrupted
        if stale.startswith(".tmp-step_"):
            shutil.rmtree(os.path.join(ckpt_root, stale), ignore_errors=True)


def resolve_checkpoint(path):
    """A run folder (its latest checkpoint), a checkpoints folder, or one checkpoint folder -> that folder."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        pointer = os.path.join(root, LATEST)
        if os.path.isfile(pointer):
            with open(pointer) as f:
                name = f.read().strip()
            candidate = os.path.join(root, name)
            if name and os.path.isfile(os.path.join(candidate, "meta.json")):
                return candidate
        if os.path.isdir(root):  # pointer missing or stale: fall back to the newest complete checkpoint
            names = _complete_checkpoints(root)
            if names:
                return os.path.join(root, names[-1])
    raise CheckpointError(f"no checkpoint found in {path!r} (expected a run folder or a step_* folder)")


def read_meta(path):
    """The meta.json of the checkpoint `path` resolves to (resolve_checkpoint), without loading any tensor: the
    step, the run's config and model record. CheckpointError (one line) when it is missing or unreadable."""
    folder = resolve_checkpoint(path)
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {folder!r} has an unreadable meta.json ({error})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {folder!r} has a meta.json that is not an object")
    return meta


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint without executing code from it. Returns a dict with meta, model, prior, optimizer
    and rng state dicts; raises CheckpointError (one line) when it is incomplete, corrupt or unsafe."""
    folder = resolve_checkpoint(path)
    missing = [f for f in CHECKPOINT_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise CheckpointError(f"checkpoint {folder!r} is incomplete: missing {', '.join(missing)}")
    meta = read_meta(folder)
    tensors = {}
    for key in ("model", "prior", "state"):
        file = os.path.join(folder, f"{key}.safetensors")
        try:
            tensors[key] = load_file(file, device=str(map_location))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"checkpoint file {file!r} is corrupt ({str(error).splitlines()[0]})") from None
    tensors["prior"].pop("_empty", None)
    for key, name in (("ema", EMA_FILE), ("sample_prior", SAMPLE_PRIOR_FILE)):  # optional files
        tensors[key] = None
        if os.path.isfile(os.path.join(folder, name)):
            try:
                tensors[key] = load_file(os.path.join(folder, name), device=str(map_location))
            except (SafetensorError, OSError, ValueError, RuntimeError) as error:
                raise CheckpointError(f"checkpoint file {os.path.join(folder, name)!r} is corrupt "
                                      f"({str(error).splitlines()[0]})") from None
            tensors[key].pop("_empty", None)
    opt_file = os.path.join(folder, "optimizer.pt")
    try:
        optimizer = torch.load(opt_file, map_location=map_location, weights_only=True)
    except Exception as error:  # weights_only refuses pickles that would run code: report, never execute
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint file {opt_file!r} is corrupt or unsafe to load ({first})") from None
    return {"folder": folder, "meta": meta, "model": tensors["model"], "prior": tensors["prior"],
            "rng": tensors["state"], "optimizer": optimizer, "ema": tensors["ema"],
            "sample_prior": tensors["sample_prior"]}
