"""torch <-> NumPy without float32 round trips (NumPy has no bfloat16; ml_dtypes does): the
tensors Meta's .pth and Hugging Face's files hold, as the arrays our tree holds."""

from __future__ import annotations

import numpy as np


def to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(x: np.ndarray):
    import ml_dtypes
    import torch

    x = np.ascontiguousarray(x)
    if not x.flags.writeable:  # torch wants to own writable memory
        x = x.copy()
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)
