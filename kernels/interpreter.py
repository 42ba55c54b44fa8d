"""Two adjustments for the Triton 3.6 interpreter; neither changes compiled kernels.

- `device_fn` decorates `@triton.jit` helpers called from kernels. Under the
  interpreter it leaves them plain Python: each call to a jit helper there re-patches
  `triton.language` (about 10 ms a call), which made the interpreter tests several
  times slower. The kernel body already runs with `triton.language` patched.
- `patch_interpreter_index` lets `range(T)` take a runtime bound under NumPy >= 2.4:
  the interpreter holds scalars as 1-element arrays and implements `__index__` as
  `int(array)`, which NumPy 2.4 rejects for arrays with a dimension.
"""

import triton
import triton.runtime.interpreter as interpreter

__all__ = ["device_fn", "patch_interpreter_index"]

_INTERPRET = bool(triton.knobs.runtime.interpret)


def device_fn(fn):
    return fn if _INTERPRET else triton.jit(fn)


def _index(self):
    return int(self.handle.data.reshape(-1)[0])


def patch_interpreter_index():
    original = interpreter._patch_lang_tensor
    if getattr(original, "_index_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    patched._index_fixed = True
    interpreter._patch_lang_tensor = patched
