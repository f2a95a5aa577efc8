"""How a checkpoint says which model to rebuild: never a pickle, always a record of JSON.

A record is either a built-in model's config (`{"name": "dcgan28", ...}`, what `build_model(**config)` takes)
or an import path with keyword arguments, the way Hydra's `_target_` and Hugging Face's config.json name a
model: `{"target": "my_pkg.nets:UNet", "kwargs": {"width": 64}}`. `rebuild` imports the module and calls the
attribute with the kwargs.

A record is code, so it gets the care the pickle refusal gets. Without trust_model_code, only an
`nn.Module` subclass is rebuilt; a factory function, or anything else, needs trust_model_code=True
(`--trust-model-code`, as Hugging Face's `trust_remote_code`). Modules of Python's standard library are
refused even with trust: no model lives there, and `os:system`, `subprocess:run` or `builtins:eval` named
in a checkpoint are how a checkpoint would run a command. The check happens before anything is called.
"""
import importlib
import inspect
import json
import re
import sys

import torch

from .models import MODEL_NAMES, build_model

_TARGET = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


class ModelRecordError(ValueError):
    """A model record that cannot or may not be rebuilt."""


def parse_target(target):
    """'pkg.module:Attr' -> ('pkg.module', 'Attr'), or a one-line error naming what is expected."""
    if not isinstance(target, str) or not _TARGET.match(target):
        raise ModelRecordError(f"model must be a built-in name ({', '.join(MODEL_NAMES)}) or MODULE:ATTR "
                               f"(e.g. my_pkg.nets:UNet), got {target!r}")
    module, attr = target.split(":")
    return module, attr


def check_kwargs(kwargs):
    """kwargs must be a JSON object (a dict that survives json.dumps and json.loads unchanged)."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise ModelRecordError(f"model kwargs must be a JSON object, got {type(kwargs).__name__}")
    try:
        round_trip = json.loads(json.dumps(kwargs))
    except (TypeError, ValueError) as error:
        raise ModelRecordError(f"model kwargs must be JSON (numbers, strings, lists, objects): {error}") from None
    if round_trip != kwargs:
        raise ModelRecordError("model kwargs must be JSON: tuples and non-string keys do not survive a checkpoint")
    return kwargs


def parse_kwargs_json(text):
    """The --model-kwargs argument: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelRecordError(f"--model-kwargs must be a JSON object, e.g. '{{\"width\": 64}}': {error.msg}") \
            from None
    return check_kwargs(value)


def target_of(model):
    """'module:QualName' of a model's class, or None where it cannot be imported by that path (a class made
    in __main__ or inside a function)."""
    cls = type(model)
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        return None
    return f"{cls.__module__}:{cls.__qualname__}"


def record_for(model, kwargs=None, target=None):
    """The record a checkpoint stores for model: a built-in model's config, else its import path and
    kwargs. target None: the class's own path (None when it is not importable, e.g. defined in __main__:
    such a run loads with Projector.load(run, model=instance)). A class-conditional model (LabelConditioned)
    records its base this way, inside a record naming the classes (ign_fast.conditional)."""
    from .conditional import LabelConditioned, conditional_record

    if isinstance(model, LabelConditioned):
        return conditional_record(record_for(model.base, kwargs, target), model.num_classes, model.image_channels)
    config = getattr(model, "config", None)
    if target is None and kwargs is None and isinstance(config, dict) and config.get("name") in MODEL_NAMES:
        return dict(config)
    if target is None:
        target = target_of(model)
    elif target in MODEL_NAMES:
        return dict(config) if isinstance(config, dict) else {"name": target, **check_kwargs(kwargs)}
    else:
        parse_target(target)
    # kwargs None: not known (a model handed over as an object); rebuild then needs the model itself
    return {"target": target, "kwargs": None if kwargs is None else check_kwargs(kwargs)}


def _is_stdlib(module):
    top = module.split(".")[0]
    return top in sys.stdlib_module_names or top in sys.builtin_module_names


def resolve(target, trust_model_code=False):
    """The class or factory a target names, after the safety checks (see the module docstring)."""
    module_name, attr = parse_target(target)
    if _is_stdlib(module_name):
        raise ModelRecordError(f"model {target!r} names Python's standard library, which holds no model; refused "
                               f"(a checkpoint naming it would run a command)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelRecordError(f"model {target!r}: cannot import {module_name!r} ({error}); install it or put its "
                               f"folder on PYTHONPATH, or pass the model itself (Projector.load(run, "
                               f"model=instance))") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelRecordError(f"model {target!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if inspect.isclass(obj) and issubclass(obj, torch.nn.Module):
        return obj
    if not callable(obj):
        raise ModelRecordError(f"model {target!r} is not callable (a {type(obj).__name__})")
    if not trust_model_code:
        raise ModelRecordError(f"model {target!r} is not an nn.Module subclass; calling it runs code named by the "
                               f"checkpoint: pass --trust-model-code (trust_model_code=True) if you trust it")
    return obj


def rebuild(record, trust_model_code=False):
    """The model a record describes (its weights not loaded)."""
    if not isinstance(record, dict):
        raise ModelRecordError(f"model record must be a dict, got {type(record).__name__}")
    if "conditional" in record:  # LabelConditioned(base): the base's own record inside
        from .conditional import LabelConditioned

        spec = record["conditional"]
        if not isinstance(spec, dict) or not isinstance(record.get("base"), dict):
            raise ModelRecordError("a conditional model record must hold 'conditional' {num_classes, "
                                   "image_channels} and a 'base' record")
        try:
            return LabelConditioned(rebuild(record["base"], trust_model_code), spec.get("num_classes"),
                                    spec.get("image_channels"))
        except (TypeError, ValueError) as error:
            if isinstance(error, ModelRecordError):
                raise
            raise ModelRecordError(f"conditional model record: {error}") from None
    if "target" in record and record["target"] is None:
        raise ModelRecordError("this run's model class was defined in __main__ or inside a function and cannot be "
                               "imported: pass the model itself (Projector.load(run, model=instance))")
    if "target" in record:
        if record.get("kwargs", {}) is None:
            raise ModelRecordError(f"this run's model {record['target']!r} was given to the trainer without "
                                   f"model_kwargs, so it cannot be rebuilt: pass the model itself "
                                   f"(Projector.load(run, model=instance)) or train with model_kwargs=")
        factory = resolve(record["target"], trust_model_code)
        kwargs = check_kwargs(record.get("kwargs"))
        try:
            model = factory(**kwargs)
        except TypeError as error:
            raise ModelRecordError(f"model {record['target']!r} does not take kwargs {kwargs}: {error}") from None
        if not isinstance(model, torch.nn.Module):
            raise ModelRecordError(f"model {record['target']!r} returned a {type(model).__name__}, not an "
                                   f"nn.Module")
        return model
    if record.get("name") in MODEL_NAMES:
        return build_model(**record)
    raise ModelRecordError(f"model record must have 'target' or a built-in 'name', got keys {sorted(record)}")


def build(target, kwargs=None, trust_model_code=False):
    """A model from a CLI-style name: a built-in name (kwargs passed to it) or MODULE:ATTR."""
    kwargs = check_kwargs(kwargs)
    if target in MODEL_NAMES:
        return build_model(target, **kwargs)
    return rebuild({"target": target, "kwargs": kwargs}, trust_model_code)
