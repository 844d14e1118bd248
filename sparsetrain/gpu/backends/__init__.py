"""Where the 2:4 GEMMs run: masked dense (`EmulatedBackend`) or cuSPARSELt (`CuSparseLtBackend`), one backend
object per layer; `resolve_backend` picks it and says why in one sentence."""
from sparsetrain.gpu.backends.base import Backend, EmulatedBackend, PreparedWeight
from sparsetrain.gpu.backends.cusparselt import CuSparseLtBackend
from sparsetrain.gpu.backends.resolve import cusparselt_shape_blockers, resolve_backend

__all__ = ["Backend", "CuSparseLtBackend", "EmulatedBackend", "PreparedWeight", "cusparselt_shape_blockers",
           "resolve_backend"]
