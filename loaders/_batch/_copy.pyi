"""Types of the C routine in ``_copy.c``: many byte ranges copied into one buffer by one call, without the GIL."""

import numpy as np

def copy(destination: np.ndarray, starts: np.ndarray, sources: np.ndarray, sizes: np.ndarray, /) -> None: ...
