"""torchvision checkpoints <-> Flax variables.

Reading tensor files (``read_tensors``), finding torchvision's standard files (``resolve_weights_path``),
loading a checkpoint into a model's freshly initialised variables with every tensor accounted for
(``load_torchvision_weights``) and writing a model back under torch names (``export_torchvision_weights``).

The models' own converters (``TorchWeights.to_flax`` / ``to_torch``) are built from the small pieces here:
per-tensor layout changes (``conv_to_flax``, ``dense_to_flax`` and their inverses) and, for models made of
standard layers, a table of layers (``layers_to_flax`` / ``layers_to_torch``).
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from oat_jax import models


class WeightsError(ValueError):
    """A weights file that cannot be read, found, or matched to a model."""


# --- one tensor -------------------------------------------------------------------------------------------

def conv_to_flax(weight):
    """torch Conv2d weight (out, in, kh, kw) -> Flax Conv kernel (kh, kw, in, out)."""
    return weight.transpose(2, 3, 1, 0)


def conv_to_torch(kernel):
    """Flax Conv kernel (kh, kw, in, out) -> torch Conv2d weight (out, in, kh, kw)."""
    return kernel.transpose(3, 2, 0, 1)


def dense_to_flax(weight):
    """torch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
    return weight.T


def dense_to_torch(kernel):
    """Flax Dense kernel (in, out) -> torch Linear weight (out, in)."""
    return kernel.T


def _same(array):
    return array


def take(tensors: dict, key: str):
    """Pops ``key`` from ``tensors``; a missing one raises KeyError(key), as ``TorchWeights.to_flax`` must."""
    if key not in tensors:
        raise KeyError(key)
    return tensors.pop(key)


# --- a table of standard layers ---------------------------------------------------------------------------

class _Tensor(NamedTuple):
    """One torch tensor of a layer: ``<prefix>.<suffix>`` <-> variables[collection][*path][name]."""
    suffix: str
    collection: str
    name: str
    to_flax: Callable = _same
    to_torch: Callable = _same


_BATCH_COUNTER = "num_batches_tracked"  # torch's BatchNorm step counter: Flax has no use for it

LAYER_KINDS: dict[str, tuple[_Tensor, ...]] = {
    "conv": (_Tensor("weight", "params", "kernel", conv_to_flax, conv_to_torch),),
    "conv_bias": (_Tensor("weight", "params", "kernel", conv_to_flax, conv_to_torch),
                  _Tensor("bias", "params", "bias")),
    "dense": (_Tensor("weight", "params", "kernel", dense_to_flax, dense_to_torch),
              _Tensor("bias", "params", "bias")),
    "layer_norm": (_Tensor("weight", "params", "scale"), _Tensor("bias", "params", "bias")),
    "batch_norm": (_Tensor("weight", "params", "scale"), _Tensor("bias", "params", "bias"),
                   _Tensor("running_mean", "batch_stats", "mean"), _Tensor("running_var", "batch_stats", "var")),
}
"""The torch tensors of each kind of layer and where Flax keeps them. ``batch_norm`` also consumes an optional
``num_batches_tracked`` on import and writes it as an int64 zero on export."""

Layer = tuple[str, tuple[str, ...], str]
"""(torch prefix, Flax module path, kind): e.g. ("layer1.0.bn1", ("layer1_0", "bn1"), "batch_norm")."""


def layers_to_flax(tensors: dict, layers: Sequence[Layer]) -> dict:
    """Flax variables {"params": ..., "batch_stats": ...} of ``layers``, popping their tensors from ``tensors``.

    A tensor that is not there raises KeyError(torch name); tensors of other layers stay in ``tensors``."""
    flat = {}
    for prefix, path, kind in layers:
        for tensor in LAYER_KINDS[kind]:
            flat[(tensor.collection, *path, tensor.name)] = tensor.to_flax(take(tensors, f"{prefix}.{tensor.suffix}"))
        if kind == "batch_norm":
            tensors.pop(f"{prefix}.{_BATCH_COUNTER}", None)  # old torchvision files lack it
    return traverse_util.unflatten_dict(flat)


def layers_to_torch(variables: Mapping, layers: Sequence[Layer]) -> dict:
    """torch-named tensors of ``layers`` from Flax ``variables``, in the order of ``layers``.

    Concrete arrays come back as numpy; traced ones stay traced, so ``jax.eval_shape`` gives the layout."""
    tensors = {}
    for prefix, path, kind in layers:
        for tensor in LAYER_KINDS[kind]:
            leaf = _get(variables, (tensor.collection, *path, tensor.name))
            tensors[f"{prefix}.{tensor.suffix}"] = _as_numpy(tensor.to_torch(leaf))
        if kind == "batch_norm":
            tensors[f"{prefix}.{_BATCH_COUNTER}"] = np.zeros((), np.int64)
    return tensors


def _get(tree: Mapping, path: Iterable[str]):
    for name in path:
        tree = tree[name]
    return tree


def _as_numpy(array):
    return array if isinstance(array, jax.core.Tracer) else np.asarray(array)


# --- files ------------------------------------------------------------------------------------------------

def _read_torch(path: str) -> Mapping:
    try:
        import torch
    except ImportError:
        raise WeightsError(f"reading {path} needs PyTorch: pip install torch (or oat_jax[torch]), "
                           f"or convert the file to .safetensors or .npz") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds (pickle, zip, runtime) for a bad file
        raise WeightsError(f"cannot read {path} as a PyTorch checkpoint: {error}") from error
    return {key: _torch_to_numpy(torch, value) for key, value in _unwrap(path, state).items()}


def _torch_to_numpy(torch, value):
    if not isinstance(value, torch.Tensor):
        return value  # read_tensors names it
    value = value.detach().cpu()
    return (value.float() if value.dtype == torch.bfloat16 else value).numpy()  # numpy has no bfloat16


def _read_safetensors(path: str) -> Mapping:
    try:
        import safetensors.numpy
    except ImportError:
        raise WeightsError(f"reading {path} needs the safetensors package: pip install safetensors") from None
    try:
        return safetensors.numpy.load_file(path)
    except Exception as error:  # SafetensorError, or numpy refusing a dtype
        raise WeightsError(f"cannot read {path} as a safetensors file: {error}") from error


def _read_npz(path: str) -> Mapping:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except Exception as error:  # BadZipFile, ValueError, OSError, EOFError
        raise WeightsError(f"cannot read {path} as a numpy .npz archive: {error}") from error


_READERS = {".pth": _read_torch, ".pt": _read_torch, ".safetensors": _read_safetensors, ".npz": _read_npz}
_WRITABLE = (".safetensors", ".npz")


def _unwrap(path: str, state) -> Mapping:
    """The state dict itself, also when a training checkpoint nests it under "state_dict" or "model"."""
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict of named tensors")
    return state


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a weights file by name, as numpy arrays.

    ``.pth``/``.pt`` are read with PyTorch (optional; ``weights_only=True``), ``.safetensors`` with the
    safetensors package (optional), ``.npz`` with numpy. A state dict nested under "state_dict" or "model" is
    accepted. A missing, unreadable or unknown file raises WeightsError naming it."""
    path = os.fspath(path)
    suffix = pathlib.Path(path).suffix.lower()
    if suffix not in _READERS:
        raise WeightsError(f"{path}: unknown weights file type {suffix or '(no extension)'!r}; "
                           f"use one of {', '.join(_READERS)}")
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path} does not exist")
    tensors = _unwrap(path, _READERS[suffix](path))
    for key, value in tensors.items():
        if not isinstance(value, np.ndarray):
            raise WeightsError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return dict(tensors)


def resolve_weights_path(spec: str) -> str:
    """The weights file that ``spec`` names: a path, or ``"torchvision:<model>"`` for torchvision's ImageNet file
    of that model, looked up in $OAT_WEIGHTS_DIR, $TORCH_HOME/hub/checkpoints, ~/.cache/torch/hub/checkpoints.

    Nothing is downloaded: a file found nowhere raises WeightsError saying where it was looked for."""
    if not spec.startswith("torchvision:"):
        path = os.path.expanduser(spec)
        if not os.path.isfile(path):
            raise WeightsError(f"weights file {path} does not exist; name another with "
                               f"--config.pretrained_weights=FILE, or train from a random initialisation "
                               f"with --config.pretrained_weights=''")
        return path
    model_name = spec.removeprefix("torchvision:")
    file_name = _conversion(model_name).standard_file
    places = _search_dirs()
    for folder in places:
        if os.path.isfile(os.path.join(folder, file_name)):
            return os.path.join(folder, file_name)
    raise WeightsError(f"{file_name} (torchvision's ImageNet weights of {model_name}) was not found in "
                       f"{', '.join(places)}; nothing is downloaded here: copy the file into one of these "
                       f"folders (or set $OAT_WEIGHTS_DIR to its folder), give its path with "
                       f"--config.pretrained_weights=FILE, or train from a random initialisation with "
                       f"--config.pretrained_weights=''")


def _search_dirs() -> list[str]:
    places = []
    if os.environ.get("OAT_WEIGHTS_DIR"):
        places.append(os.environ["OAT_WEIGHTS_DIR"])
    if os.environ.get("TORCH_HOME"):
        places.append(os.path.join(os.environ["TORCH_HOME"], "hub", "checkpoints"))
    places.append(os.path.expanduser(os.path.join("~", ".cache", "torch", "hub", "checkpoints")))
    return places


# --- whole models -----------------------------------------------------------------------------------------

def _conversion(model_name: str) -> models.TorchWeights:
    conversion = models.torch_weights(model_name)
    if conversion is None:
        convertible = [name for name in models.model_names() if models.torch_weights(name) is not None]
        raise WeightsError(f"model {model_name!r} has no torchvision weights conversion; "
                           f"models that have one: {', '.join(convertible)}")
    return conversion


def _names(keys: Iterable[str], limit: int = 10) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_against(path: str, model_name: str, tensors: Mapping, expected: Mapping) -> None:
    """Missing tensors and shape mismatches, in torch names (unexpected ones are what to_flax leaves)."""
    missing = [key for key in expected if key not in tensors and not key.endswith(_BATCH_COUNTER)]
    if missing:
        raise WeightsError(f"{path}: tensors of {model_name} missing from the file: {_names(missing)}")
    for key, value in tensors.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise WeightsError(f"{path}: tensor {key} has shape {tuple(value.shape)} in the file, "
                               f"but {model_name} expects {tuple(expected[key].shape)}")


def _to_flax(path: str, model_name: str, conversion: models.TorchWeights, tensors: dict) -> dict:
    try:
        converted = conversion.to_flax(tensors)
    except KeyError as error:
        raise WeightsError(f"{path}: tensor {error.args[0]} of {model_name} is missing from the file") from None
    if tensors:
        raise WeightsError(f"{path}: unexpected tensors for {model_name}: {_names(tensors)}")
    return converted


def _replace_body(model_name: str, variables: Mapping, converted: Mapping) -> dict:
    """``variables`` with the converted leaves in their place (as the leaves' dtype); only the head is kept."""
    flat = traverse_util.flatten_dict(variables)
    for key, value in traverse_util.flatten_dict(converted).items():
        if key not in flat or flat[key].shape != value.shape:
            raise WeightsError(f"the {model_name} conversion gives {'/'.join(key)} of shape {value.shape}, "
                               f"which the model's variables do not have")
        flat[key] = jnp.asarray(value, dtype=flat[key].dtype)
    not_loaded = set(traverse_util.flatten_dict(variables)) - set(traverse_util.flatten_dict(converted))
    not_loaded = [key for key in not_loaded if key[1] != "head"]
    if not_loaded:
        raise WeightsError(f"the {model_name} conversion leaves {_names('/'.join(key) for key in not_loaded)} "
                           f"unset")
    return traverse_util.unflatten_dict(flat)


def load_torchvision_weights(model_name: str, path: str | os.PathLike, variables: Mapping) -> dict:
    """``variables`` (model ``model_name``'s freshly initialised ones) with everything but the head replaced
    by the torchvision-named weights in file ``path``.

    The file's head tensors are dropped, so the fresh head (any number of classes) stays. Every other tensor
    must match: a missing, unexpected or differently shaped one raises WeightsError naming it."""
    path = os.fspath(path)
    conversion = _conversion(model_name)
    tensors = read_tensors(path)
    for key in conversion.head_keys:
        tensors.pop(key, None)
    expected = {key: value for key, value in conversion.to_torch(variables).items()
                if key not in conversion.head_keys}
    _check_against(path, model_name, tensors, expected)
    return _replace_body(model_name, variables, _to_flax(path, model_name, conversion, tensors))


def export_torchvision_weights(model_name: str, variables: Mapping, path: str | os.PathLike) -> None:
    """Writes model ``model_name``'s ``variables`` under torchvision's names to a ``.safetensors`` or ``.npz``
    file, head included (torch: ``model.load_state_dict(safetensors.torch.load_file(path))``)."""
    path = os.fspath(path)
    suffix = pathlib.Path(path).suffix.lower()
    if suffix not in _WRITABLE:
        raise WeightsError(f"{path}: cannot write weights as {suffix or '(no extension)'!r}; "
                           f"use one of {', '.join(_WRITABLE)}")
    tensors = {key: np.array(value, order="C") for key, value in _conversion(model_name).to_torch(variables).items()}
    if suffix == ".npz":
        np.savez(path, **tensors)
        return
    try:
        import safetensors.numpy
    except ImportError:
        raise WeightsError(f"writing {path} needs the safetensors package: pip install safetensors, "
                           f"or write .npz") from None
    safetensors.numpy.save_file(tensors, path)
