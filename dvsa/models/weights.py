"""Weight files read safely, whatever shape their authors saved them in.

Every file is read with ``torch.load(weights_only=True)`` (tensors and plain containers only,
never pickled objects); a file that is not such a file is one line saying why. A state dict may
come

* bare (``model.state_dict()``), or wrapped as ``{"state_dict": ...}`` or ``{"model": ...}``
  (training scripts' checkpoints, with the epoch, optimizer, ... beside it);
* saved from ``DistributedDataParallel``: every key prefixed ``module.``;
* without the layers the loading module lists as optional (a CNN trunk saved without its
  classifier); any other missing key, a key the module does not have, or a shape that differs
  is refused, naming the first few keys and how many there are.

A file downloaded by ``torch.hub`` (torchvision's weights) is named ``<name>-<hex>.pth`` after
the first hex digits of its sha256: :func:`check_hash_in_name` refuses a damaged or replaced one.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from dvsa.errors import DvsaError, first_few

WRAPPER_KEYS = ("state_dict", "model")   # {"state_dict": sd} or {"model": sd}, in this order
DDP_PREFIX = "module."
HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")   # torch.hub's "<name>-<sha256 prefix>.pth"


# --------------------------------------------------------------------------- reading


def load_weights_only(path: str | os.PathLike, failure: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, map_location, weights_only=True)``; a file it cannot read is
    ``DvsaError("<failure>: <one-line reason>")``."""
    try:
        with warnings.catch_warnings():   # torch warns (several lines) about unusual pickle protocols
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a missing, truncated, pickled or foreign file: all the user's to fix
        raise DvsaError(f"{failure}: {load_failure(e)}") from None


def load_failure(e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line (torch's own text is a page)."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError):
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            return (f"it holds a {found.group(1)} object, which only pickle can load "
                    f"(weights are read with weights_only=True, never unpickled)")
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        return "not a torch.save file of tensors" + (f" ({detail.group(1).strip()})" if detail else "")
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = first.split(". ")[0]
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def state_dict_of(obj: Any, source: str) -> dict[str, Tensor]:
    """The state dict inside what a weights file held: unwrapped from ``{"state_dict": ...}`` /
    ``{"model": ...}``, its DDP ``module.`` prefix removed."""
    for _ in range(len(WRAPPER_KEYS)):   # {"model": {"state_dict": ...}} at most
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise DvsaError(f"{source} holds a {type(obj).__name__}, not a state dict")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise DvsaError(f"{source} is not a state dict: {len(not_tensors)} entries are not tensors "
                        f"({first_few(not_tensors)})")
    keys = [str(k) for k in obj]
    if keys and all(k.startswith(DDP_PREFIX) for k in keys):
        return {k[len(DDP_PREFIX):]: v for k, v in zip(keys, obj.values())}
    return dict(zip(keys, obj.values()))


def read_state_dict(path: str | os.PathLike, source: str) -> dict[str, Tensor]:
    """The state dict of a weights file (see the module doc for the shapes accepted)."""
    return state_dict_of(load_weights_only(path, f"{source}: cannot read {path}"), f"{source}: {path}")


# --------------------------------------------------------------------------- loading


def load_into(module: nn.Module, state: Mapping[str, Tensor], source: str, name: str,
              optional: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module``. Keys starting with a prefix in ``optional`` may be missing
    (they keep the module's values); every other key must match the module's, shape included.
    Refusals are ``DvsaError("<source>: does not fit <name>: ...")`` naming the first few keys."""
    own = module.state_dict()
    reshaped = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if reshaped:
        k = reshaped[0]
        raise DvsaError(f"{source}: does not fit {name}: {len(reshaped)} tensors differ in shape "
                        f"({first_few(reshaped)}; {k}: {tuple(state[k].shape)} in the file, "
                        f"{tuple(own[k].shape)} in {name})")
    result = module.load_state_dict(dict(state), strict=False)   # BatchNorm fills a missing num_batches_tracked
    missing = [k for k in result.missing_keys if not k.startswith(optional)]
    if missing:
        raise DvsaError(f"{source}: does not fit {name}: {len(missing)} of its {len(own)} keys are missing "
                        f"from the file ({first_few(missing)})")
    if result.unexpected_keys:
        raise DvsaError(f"{source}: does not fit {name}: the file has {len(result.unexpected_keys)} keys "
                        f"{name} does not ({first_few(result.unexpected_keys)})")


# --------------------------------------------------------------------------- downloads


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_hash_in_name(path: str | os.PathLike, source: str, url: str) -> None:
    """A hub download named ``<name>-<hex>.<ext>`` must have a sha256 starting with ``<hex>``
    (what ``torch.hub`` checks after downloading); a partial or replaced file is refused."""
    named = HASH_IN_NAME.search(os.path.basename(path))
    if named is None:
        return
    expected = named.group(1)
    actual = sha256_of(path)[:len(expected)]
    if actual != expected:
        raise DvsaError(f"{source}: {path} is damaged or not the published file (its sha256 starts "
                        f"{actual}, its name says {expected}); delete it and download {url} again")
