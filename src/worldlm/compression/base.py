"""What every codec shares: compact tensor names, pass-through of non-float tensors, and the
checks that a compact dict has exactly the parts its codec needs.

A codec turns `{name: tensor}` into compact tensors named `<name>::<part>` (`w::q`,
`w::scale`, ...) and back. Only floating tensors are compressed; any other tensor travels whole
as `<name>::raw`. Decoding trusts nothing: the compact dict comes from another node, so every
name, part, dtype and shape is checked against `like` (what the receiver knows the tensors must
be) before any value is used, and a bad one raises `WireError` naming the tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from worldlm.errors import WireError

SEP = "::"  # between a tensor's name and its part; parameter names hold dots, never "::"
RAW = "raw"  # the part of a tensor sent whole (integer and bool tensors)

Parts = dict[str, torch.Tensor]  # part name -> compact tensor, for one tensor


def compact_name(name: str, part: str) -> str:
    return f"{name}{SEP}{part}"


def split_compact(compact: Mapping[str, torch.Tensor]) -> dict[str, Parts]:
    """Compact tensors grouped by the tensor they belong to, in arrival order."""
    grouped: dict[str, Parts] = {}
    for key, tensor in compact.items():
        name, sep, part = key.rpartition(SEP)
        if not sep or not name or not part:
            raise WireError(f"compact tensor {key!r} is not named <tensor>{SEP}<part>")
        if not isinstance(tensor, torch.Tensor):
            raise WireError(f"compact tensor {key!r} is a {type(tensor).__name__}, not a tensor")
        grouped.setdefault(name, {})[part] = tensor
    return grouped


def check_tensor(
    where: str, tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...]
) -> None:
    """Refuse a compact tensor of another dtype or shape than its codec sends."""
    if tensor.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise WireError(
            f"{where}: dtype {str(tensor.dtype).removeprefix('torch.')}, expected {names}"
        )
    if tuple(tensor.shape) != shape:
        raise WireError(f"{where}: shape {tuple(tensor.shape)}, expected {shape}")


class TensorCodec(ABC):
    """A codec defined one floating tensor at a time; `compress` and `decompress` work on
    whole dicts and handle naming, pass-through and the checks common to all codecs."""

    name = "base"
    parts: tuple[str, ...] = ()  # the compact parts of one floating tensor

    @abstractmethod
    def encode_tensor(self, x: torch.Tensor) -> Parts:
        """The compact parts of one floating tensor."""

    @abstractmethod
    def decode_tensor(self, where: str, parts: Parts, like: torch.Tensor) -> torch.Tensor:
        """`like`'s value from its checked-for-names `parts`; checks dtypes, shapes, values."""

    def compress(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The compact tensors of `tensors` (only floating ones are compressed)."""
        compact: dict[str, torch.Tensor] = {}
        for name, x in tensors.items():
            parts = self.encode_tensor(x) if x.is_floating_point() else {RAW: x}
            compact.update({compact_name(name, part): t for part, t in parts.items()})
        return compact

    def decompress(
        self, compact: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Tensors shaped and typed like `like`, from exactly the compact tensors `compress`
        gives for them; anything missing, extra or malformed raises `WireError`."""
        grouped = split_compact(compact)
        extra = sorted(grouped.keys() - like.keys())
        if extra:
            raise WireError(
                f"{self.name}: compact tensors for {extra[0]!r}, not an expected tensor"
            )
        out: dict[str, torch.Tensor] = {}
        for name, reference in like.items():
            where = f"{self.name} {name!r}"
            parts = grouped.get(name)
            if parts is None:
                raise WireError(f"{where}: no compact tensors")
            expected = self.parts if reference.is_floating_point() else (RAW,)
            if set(parts) != set(expected):
                raise WireError(f"{where}: parts {sorted(parts)}, expected {sorted(expected)}")
            if not reference.is_floating_point():
                raw = parts[RAW]
                check_tensor(f"{where} {RAW}", raw, (reference.dtype,), tuple(reference.shape))
                out[name] = raw
                continue
            out[name] = self.decode_tensor(where, parts, reference)
        return out
