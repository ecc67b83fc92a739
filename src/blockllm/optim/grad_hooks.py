"""The per-tensor gradient hooks through which BlockLLM sees selection-step gradients."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

# Which hook set currently drives a parameter, by id(param). A parameter can only be collected
# after every optimizer holding it is, so a live entry always refers to the same tensor.
_OWNERS: dict[int, weakref.ReferenceType[GradHooks]] = {}


def _remove_all(handles: dict[int, Any]) -> None:
    for handle in handles.values():
        handle.remove()
    handles.clear()


class GradHooks:
    """One ``register_post_accumulate_grad_hook`` per candidate tensor, owned by one optimizer.

    The hooks hold only a weak reference to the optimizer, so a model does not keep a dropped
    optimizer alive, and they are removed when it is collected. A tensor is driven by one hook set
    at a time: attaching it to a newer optimizer detaches it from the older one, so an optimizer
    the user stopped using can never free the gradients the new one needs.

    Args:
        owner: the optimizer; ``callback(owner, index, tensor)`` runs after each accumulation.
        callback: called with the owner, the candidate index and the tensor.
    """

    def __init__(self, owner: object, callback: Callable[[Any, int, torch.Tensor], None]) -> None:
        self._owner = weakref.ref(owner)
        self._callback = callback
        self._handles: dict[int, Any] = {}
        weakref.finalize(owner, _remove_all, self._handles)

    def __len__(self) -> int:
        return len(self._handles)

    def attach(self, param: torch.Tensor, index: int) -> bool:
        """Drive ``param``'s hook from here; True when it was taken from another optimizer."""
        previous = _OWNERS.get(id(param))
        previous_hooks = previous() if previous is not None else None
        taken = previous_hooks is not None and previous_hooks is not self
        if taken:
            previous_hooks.detach(param)
        _OWNERS[id(param)] = weakref.ref(self)
        owner_ref, callback = self._owner, self._callback

        def on_grad_accumulated(tensor: torch.Tensor, _index: int = index) -> None:
            owner = owner_ref()
            if owner is not None:
                callback(owner, _index, tensor)

        self._handles[id(param)] = param.register_post_accumulate_grad_hook(on_grad_accumulated)
        return taken

    def detach(self, param: torch.Tensor) -> None:
        handle = self._handles.pop(id(param), None)
        if handle is not None:
            handle.remove()
