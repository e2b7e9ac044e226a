"""Nested states (``state_dict()`` outputs) as named arrays plus a JSON skeleton.

A trainer's state is a tree: dicts (string or int keys), lists, tuples, torch tensors,
numpy arrays and scalars, Python ints, floats, bools, strings and ``None``. It becomes
``(arrays, skeleton)``: every tensor/array a named array (``a0``, ``a1`` ...), everything
else JSON. The pair goes into a wire frame (snapshot parts) or a safetensors file with
the skeleton in its metadata (universal checkpoints) — never a pickle. Decoding validates
the skeleton (depth, size, names, types) and rebuilds tensors bit for bit (``bfloat16``
travels as its ``uint16`` bit pattern; floats as shortest-repr JSON, NaN/inf by name).

Example::

    >>> import numpy as np
    >>> arrays, skel = flatten_state({"w": np.ones(2, np.float32), 3: [1.5, None, "x"]})
    >>> sorted(arrays)
    ['a0']
    >>> unflatten_state(arrays, skel)[3]
    [1.5, None, 'x']
    >>> frame = encode_state({"step": 7})
    >>> decode_state(frame)[0]
    {'step': 7}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from monolith_py.errors import DecodeError, InvalidInputError
from monolith_py.wire import WireLimits, decode_arrays, encode_arrays

__all__ = ["flatten_state", "unflatten_state", "encode_state", "decode_state", "MAX_DEPTH",
           "MAX_NODES"]

MAX_DEPTH = 64
MAX_NODES = 1 << 20
_SPECIAL = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach") and hasattr(x, "dtype")


def _float(x: float) -> Any:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(x)


def flatten_state(obj: Any) -> tuple[dict[str, np.ndarray], Any]:
    """``(arrays, skeleton)`` of a nested state (see the module docstring).

    Tensors and arrays are copied (so the result is a consistent snapshot even if training
    continues). Raises :class:`InvalidInputError` for unsupported leaves (e.g. objects).
    """
    arrays: dict[str, np.ndarray] = {}

    def add(arr: np.ndarray) -> str:
        name = f"a{len(arrays)}"
        arrays[name] = arr
        return name

    def walk(x: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise InvalidInputError(f"state nests deeper than {MAX_DEPTH} levels")
        if x is None:
            return {"n": 0}
        if isinstance(x, (bool, np.bool_)):
            return {"b": bool(x)}
        if isinstance(x, int):
            return {"i": int(x)}
        if isinstance(x, float):
            return {"f": _float(x)}
        if isinstance(x, str):
            return {"s": x}
        if isinstance(x, np.generic):
            return {"S": add(np.array(x))}
        if isinstance(x, np.ndarray):
            return {"A": add(np.array(x, copy=True, order="C"))}
        if _is_tensor(x):
            t = x.detach().cpu().contiguous()
            dt = str(t.dtype).removeprefix("torch.")
            if dt == "bfloat16":
                import torch

                arr = t.view(torch.int16).numpy().view(np.uint16).copy()
            else:
                arr = t.numpy().copy()
            return {"T": add(arr), "dt": dt}
        if isinstance(x, Mapping):
            items = []
            for k, v in x.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise InvalidInputError(
                        f"state dict keys must be str or int, got {type(k).__name__} {k!r}")
                items.append([k, walk(v, depth + 1)])
            return {"d": items}
        if isinstance(x, list):
            return {"l": [walk(v, depth + 1) for v in x]}
        if isinstance(x, tuple):
            return {"u": [walk(v, depth + 1) for v in x]}
        raise InvalidInputError(
            f"cannot snapshot a {type(x).__name__}: states hold tensors, arrays, numbers, "
            "strings, None, dicts, lists and tuples")

    return arrays, walk(obj, 0)


def _bad(msg: str) -> DecodeError:
    return DecodeError(f"bad state skeleton: {msg}")


def unflatten_state(arrays: Mapping[str, np.ndarray], skeleton: Any) -> Any:
    """Rebuild the state from :func:`flatten_state` output (arrays are copied, tensors
    are ``torch`` tensors). Raises :class:`DecodeError` for a malformed skeleton."""
    used: set[str] = set()
    count = [0]
    torch_mod: list[Any] = []

    def torch() -> Any:
        if not torch_mod:
            import torch as t

            torch_mod.append(t)
        return torch_mod[0]

    def array(name: Any) -> np.ndarray:
        if not isinstance(name, str) or name not in arrays:
            raise _bad(f"unknown array {name!r}")
        if name in used:
            raise _bad(f"array {name!r} referenced twice")
        used.add(name)
        return np.array(arrays[name], copy=True)

    def walk(node: Any, depth: int) -> Any:
        count[0] += 1
        if depth > MAX_DEPTH or count[0] > MAX_NODES:
            raise _bad("too deep or too many nodes")
        if not isinstance(node, dict) or not node:
            raise _bad(f"node must be a non-empty object, got {type(node).__name__}")
        tag = next(iter(node))
        v = node[tag]
        if tag == "n":
            return None
        if tag == "b" and isinstance(v, bool):
            return v
        if tag == "i" and isinstance(v, int) and not isinstance(v, bool):
            return v
        if tag == "f":
            if isinstance(v, str) and v in _SPECIAL:
                return _SPECIAL[v]
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
        if tag == "s" and isinstance(v, str):
            return v
        if tag == "S":
            a = array(v)
            if a.ndim != 0:
                raise _bad(f"scalar {v!r} is not 0-d")
            return a[()]
        if tag == "A":
            return array(v)
        if tag == "T":
            a = array(v)
            dt = node.get("dt")
            t = torch()
            if dt == "bfloat16":
                if a.dtype != np.uint16:
                    raise _bad("bfloat16 tensor must travel as uint16")
                return t.from_numpy(a.view(np.int16)).view(t.bfloat16)
            tensor = t.from_numpy(a)
            if str(tensor.dtype).removeprefix("torch.") != dt:
                raise _bad(f"tensor {v!r} is {tensor.dtype}, skeleton says {dt!r}")
            return tensor
        if tag == "d" and isinstance(v, list):
            out: dict[Any, Any] = {}
            for pair in v:
                if (not isinstance(pair, list) or len(pair) != 2 or isinstance(pair[0], bool)
                        or not isinstance(pair[0], (str, int))):
                    raise _bad("dict items must be [str|int key, node] pairs")
                out[pair[0]] = walk(pair[1], depth + 1)
            return out
        if tag == "l" and isinstance(v, list):
            return [walk(x, depth + 1) for x in v]
        if tag == "u" and isinstance(v, list):
            return tuple(walk(x, depth + 1) for x in v)
        raise _bad(f"unknown or malformed node {tag!r}")

    return walk(skeleton, 0)


def encode_state(obj: Any, meta: Mapping[str, Any] | None = None) -> bytes:
    """A wire frame holding ``obj`` (skeleton in ``meta["tree"]``) and ``meta``."""
    arrays, skeleton = flatten_state(obj)
    m = dict(meta or {})
    m["tree"] = skeleton
    return encode_arrays(arrays, m)


def decode_state(buf: Any, *, limits: WireLimits | None = None) -> tuple[Any, dict[str, Any]]:
    """``(state, meta)`` from :func:`encode_state` output (checksum required)."""
    if limits is None:
        arrays, meta = decode_arrays(buf, require_checksum=True)
    else:
        arrays, meta = decode_arrays(buf, limits=limits, require_checksum=True)
    if "tree" not in meta:
        raise DecodeError("bad state frame: no 'tree' in its metadata")
    tree = meta.pop("tree")
    return unflatten_state(arrays, tree), meta
