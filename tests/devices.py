"""A second device on a CPU-only machine, to catch device mix-ups without a GPU.

``elsewhere(module)`` marks a module's weights as living on another device (they report ``meta`` as their
device; their data stays on the CPU, so the model still computes). Inside ``Elsewhere()``, every torch
call is checked as CUDA would check it: an op that mixes a tensor on that device with a CPU tensor (one
that was never moved with ``.to(model's device)`` or created with ``device=``) raises ``DeviceMixup``, and
so does ``.numpy()`` of a device tensor (CUDA needs ``.cpu()`` first). Embedding lookups and indexing,
which some backends let through, are checked too. Zero-dim CPU tensors pass (CUDA takes them as scalars).

    model = elsewhere(loader.load_model(ref))
    with Elsewhere():
        out = step.losses(model, ...)  # raises if a batch or a mask stayed on the CPU
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")  # what the marked tensors report


class DeviceMixup(RuntimeError):
    pass


class OnDevice(torch.Tensor):
    """A CPU tensor that counts as being on ``DEVICE`` (only ``Elsewhere`` gives it meaning)."""

    __torch_function__ = torch._C._disabled_torch_function_impl


def _names_device(value) -> bool | None:
    """True for ``DEVICE`` (or a tensor on it), False for another device, None when not a device."""
    if isinstance(value, OnDevice):
        return True
    if isinstance(value, torch.Tensor):
        return False
    if isinstance(value, str | torch.device):
        try:
            return torch.device(value).type == DEVICE.type
        except RuntimeError:
            return None  # a string that is no device
    return None


class Elsewhere(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func == torch.Tensor.device.__get__:
            return DEVICE if isinstance(args[0], OnDevice) else torch.device("cpu")
        self.calls += 1
        name = getattr(func, "__name__", repr(func))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = any(isinstance(t, OnDevice) for t in tensors)
        target = None  # where the result goes when the call names a device
        if kwargs.get("device") is not None:
            target = _names_device(kwargs["device"])
            if target:
                kwargs["device"] = "cpu"
        if name in ("to", "cuda", "cpu") and isinstance(args[0], torch.Tensor):
            if name == "cpu":
                target = False
            elif name == "cuda":
                target = True
            for i, a in enumerate(args[1:], 1):
                named = _names_device(a)
                if named is not None:
                    target = named
                    if named and not isinstance(a, torch.Tensor):
                        args = (*args[:i], torch.device("cpu"), *args[i + 1 :])
        if name == "numpy" and on_device:
            raise DeviceMixup("numpy() of a tensor on the device: move it with .cpu() first")
        if target is None:
            strays = [t for t in tensors if not isinstance(t, OnDevice) and t.dim() > 0]
            if on_device and strays:
                shapes = [tuple(t.shape) for t in strays]
                raise DeviceMixup(f"{name}: CPU tensors {shapes} meet tensors on the model's device")
            target = on_device
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)

        def mark(x):  # a new object only where the type changes: in-place results stay themselves
            if not isinstance(x, torch.Tensor) or isinstance(x, OnDevice) == bool(target):
                return x
            return x.as_subclass(OnDevice if target else torch.Tensor)

        return tree_map(mark, out)


def elsewhere(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with its parameters and buffers marked as on ``DEVICE`` (in place)."""
    with Elsewhere():
        for m in module.modules():
            for n, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[n] = torch.nn.Parameter(p.data.as_subclass(OnDevice), p.requires_grad)
            for n, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[n] = b.as_subclass(OnDevice)
    return module
