"""Hooks a user put on a wrapped base layer, run around the adapted computation that stands in for it."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable

from torch import nn

_warned_backward: set[int] = set()


def has_forward_hooks(module: nn.Module) -> bool:
    """True when ``module`` has forward pre-hooks or forward hooks of its own (not global ones)."""
    return bool(module._forward_pre_hooks or module._forward_hooks)


def call_with_hooks(module: nn.Module, fn: Callable, args: tuple, kwargs: dict) -> Any:
    """``fn(*args, **kwargs)`` as if it were ``module``'s forward, with ``module``'s hooks run as torch runs them.

    Forward pre-hooks (plain or ``with_kwargs``) see the inputs first and may replace them; forward
    hooks then see the inputs and the result and may replace the result; ``always_call`` hooks also run
    when ``fn`` raises. While ``fn`` runs the hooks are set aside, so a call of ``module`` inside ``fn``
    (the adapted layer calls its base layer when disabled or merged) does not run them a second time.
    Backward hooks are not run (the adapted op has its own backward): a warning says so, once per module.
    """
    if (module._backward_hooks or module._backward_pre_hooks) and id(module) not in _warned_backward:
        _warned_backward.add(id(module))
        warnings.warn(f"backward hooks on the adapted {type(module).__name__} are not run: the SNELLA layer "
                      "computes its gradients itself; register them on the SnellaLayer instead")
    pre_hooks, hooks = module._forward_pre_hooks, module._forward_hooks
    for hook_id, hook in list(pre_hooks.items()):
        if hook_id in module._forward_pre_hooks_with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"forward pre-hook must return None or a tuple of (new_args, new_kwargs), "
                                       f"but got {result}.")
                args, kwargs = result
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    module._forward_pre_hooks, module._forward_hooks = OrderedDict(), OrderedDict()
    try:
        output = fn(*args, **kwargs)
    except Exception:
        for hook_id, hook in list(hooks.items()):
            if hook_id in module._forward_hooks_always_called:
                try:
                    _run_forward_hook(module, hook_id, hook, args, kwargs, None)
                except Exception as err:  # as torch does: the first error is the one raised
                    warnings.warn(f"module forward hook with always_call=True raised an exception that was "
                                  f"silenced as another error was raised in forward: {err}")
        raise
    finally:
        module._forward_pre_hooks, module._forward_hooks = pre_hooks, hooks  # the same dicts: handles still work
    for hook_id, hook in list(hooks.items()):
        result = _run_forward_hook(module, hook_id, hook, args, kwargs, output)
        if result is not None:
            output = result
    return output


def _run_forward_hook(module: nn.Module, hook_id: int, hook: Callable, args: tuple, kwargs: dict, output: Any):
    if hook_id in module._forward_hooks_with_kwargs:
        return hook(module, args, kwargs, output)
    return hook(module, args, output)
