"""Loader for face-parsing.PyTorch's `79999_iter.pth` (zllrunning/face-parsing.PyTorch).

The file is a plain state_dict of `BiSeNet(n_classes=19)` (train.py saves
`net.module.state_dict()` under DataParallel, so there is no 'module.' prefix) and is read
by test.py with `net.load_state_dict(torch.load(path))`, i.e. strictly. We do the same.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch

from faceedit.checkpoint import CheckpointError, load_state_dict_strict, read_torch_file
from faceedit.nets.bisenet import BiSeNet, BiSeNetConfig

log = logging.getLogger(__name__)


def load_bisenet(path: str | Path, config: BiSeNetConfig = BiSeNetConfig()) -> BiSeNet:
    """The parser in eval mode on the CPU, every key of the file used, none missing."""
    path = Path(path)
    data = read_torch_file(path)
    if not isinstance(data, Mapping) or not data:
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, expected a plain BiSeNet state_dict "
                              f"(the 79999_iter.pth layout: parameter name -> tensor)")
    not_tensors = [k for k, v in data.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: is not a plain state_dict: entries {not_tensors[:10]} are not tensors "
                              f"(a training checkpoint wrapper? 79999_iter.pth maps parameter names to tensors)")
    prefixed = [k for k in data if str(k).startswith("module.")]
    if prefixed:
        raise CheckpointError(
            f"{path}: {len(prefixed)} of {len(data)} keys carry the 'module.' prefix of a DataParallel/DDP model "
            f"(e.g. {prefixed[0]!r}); 79999_iter.pth is saved without it: strip 'module.' from the keys")
    model = BiSeNet(config)
    load_state_dict_strict(model, data, source=str(path))
    log.info("%s: BiSeNet face parser (%d classes, %d keys)", path, config.n_classes, len(data))
    return model.eval()
