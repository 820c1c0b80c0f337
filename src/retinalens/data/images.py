"""A torch Dataset of image files (or fetched bytes): decoding runs in DataLoader workers, so it
overlaps the backbone's compute; a bad image yields its error message instead of stopping the batch."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch
from torch.utils.data import Dataset

from ..errors import ImageDecodeError
from .transforms import Preprocessing

ImageItem = Union[Path, bytes]


class ImageFiles(Dataset):
    def __init__(self, items: Sequence[ImageItem], preprocessing: Preprocessing, names: Sequence[str] | None = None) -> None:
        self.items, self.pp = items, preprocessing
        self.names = names

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            return self.pp.load(self.items[i], name=self.names[i] if self.names else None), i, ""
        except ImageDecodeError as exc:
            return torch.zeros(3, self.pp.size, self.pp.size), i, str(exc)
