"""Shared pytest setup: the tests use tiny tensors, where one intra-op thread is fastest and most stable."""

import torch

torch.set_num_threads(1)


def _interpreter_scalar_bounds() -> None:
    """Under Triton's interpreter (TRITON_INTERPRET=1, a CPU debugging aid for the kernels), a scalar is
    a one-element array, and with NumPy 2.4 `int()` of one raises: every kernel loop whose bound is
    computed at run time failed there. Convert through `.item()` instead."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch


_interpreter_scalar_bounds()
