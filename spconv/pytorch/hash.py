"""HashTable: spconv 2.x's 32/64-bit key-value table (CPU), backed by ``torch.classes.spconv.HashTable``.

Semantics on the CPU, as spconv 2.3.8's CPU table (``tsl::robin_map``) has them, plus:

- ``insert`` keeps the **first** value of a key that is already in the table (also within one call);
  without ``values`` new keys get 0.
- ``items()`` and ``assign_arange_()`` go through the entries in **insertion order** (spconv's order
  is the robin map's, i.e. arbitrary), so results are deterministic.
- ``max_size > 0`` caps the number of distinct keys: an ``insert`` that would pass it raises
  ``ValueError`` and leaves the table unchanged. ``max_size=-1`` (the default) grows as needed.
- Keys must have the table's ``key_dtype`` and values its ``value_dtype`` (spconv checks only the
  item size); keys and values are 1-D and of equal length. Violations raise ``ValueError``.
"""
from typing import Optional, Tuple

import torch

import spconv._C  # noqa: F401  (registers torch.classes.spconv.HashTable)

_TORCH_DTYPE_TO_ITEMSIZE = {
    torch.int32: 4,
    torch.int64: 8,
    torch.float32: 4,
    torch.float64: 8,
}

_KEY_DTYPES = (torch.int32, torch.int64)


class HashTable:
    """A key -> value table for int32/int64 keys and 4- or 8-byte values.

    Args:
        device: only the CPU is supported in this build.
        key_dtype: ``torch.int32`` or ``torch.int64``.
        value_dtype: ``torch.int32``, ``torch.int64``, ``torch.float32`` or ``torch.float64``.
        max_size: maximum number of keys (``-1``: unbounded). spconv's CUDA table needs it; on the CPU
            it is optional and, when given, enforced.
    """

    def __init__(self, device: torch.device, key_dtype: torch.dtype, value_dtype: torch.dtype,
                 max_size: int = -1) -> None:
        device = torch.device(device)
        if device.type != "cpu":
            raise NotImplementedError(f"HashTable on '{device}' is not supported yet (HashTable has no GPU kernel, "
                                      "only a CPU one); use device='cpu'")
        if key_dtype not in _KEY_DTYPES:
            raise ValueError(f"HashTable: key_dtype must be torch.int32 or torch.int64, got {key_dtype}")
        if value_dtype not in _TORCH_DTYPE_TO_ITEMSIZE:
            raise ValueError("HashTable: value_dtype must be torch.int32, torch.int64, torch.float32 or "
                             f"torch.float64, got {value_dtype}")
        if max_size == 0 or max_size < -1:
            raise ValueError(f"HashTable: max_size must be -1 (unbounded) or > 0, got {max_size}")
        self.is_cpu = True
        self.device = device
        self.key_dtype = key_dtype
        self.value_dtype = value_dtype
        self.max_size = int(max_size)
        self.key_itemsize = _TORCH_DTYPE_TO_ITEMSIZE[key_dtype]
        self.value_itemsize = _TORCH_DTYPE_TO_ITEMSIZE[value_dtype]
        self.keys_data = None  # spconv's CUDA storage; None on the CPU, as in spconv
        self.values_data = None
        self._table = torch.classes.spconv.HashTable(key_dtype, value_dtype, self.max_size)

    def __len__(self) -> int:
        return self._table.size()

    def insert(self, keys: torch.Tensor, values: Optional[torch.Tensor] = None) -> None:
        """Inserts keys (with values, else 0). Keys already present keep their first value."""
        self._table.insert(keys, values)

    def query(self, keys: torch.Tensor, values: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(values, is_empty)``: the keys' values and a bool mask, True where the key is absent.

        When ``values`` is given it is filled in place (entries of absent keys are left unchanged);
        otherwise a new tensor is returned, 0 where the key is absent.
        """
        return self._table.query(keys, values)

    def insert_exist_keys(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Sets the values of keys already in the table; returns uint8 ``[N]``, non-zero where the key was
        absent (nothing is inserted for those)."""
        return self._table.insert_exist_keys(keys, values)

    def assign_arange_(self) -> torch.Tensor:
        """Sets the values to ``0 .. count-1`` in insertion order; returns ``count`` as int64 ``[1]``.
        The value dtype must be int32 or int64."""
        return torch.tensor([self._table.assign_arange_()], dtype=torch.int64)

    def items(self, max_size: int = -1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(keys, values, count)`` with every entry in insertion order and ``count`` int64 ``[1]``.

        ``max_size`` is accepted for spconv compatibility and ignored on the CPU, as spconv does.
        """
        keys, values = self._table.items()
        return keys, values, torch.tensor([keys.shape[0]], dtype=torch.int64)

    def clear(self) -> None:
        """Removes every entry."""
        self._table.clear()
