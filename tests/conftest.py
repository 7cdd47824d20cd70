"""Tests run JAX on the CPU with 8 simulated devices; this must happen before jax is imported.
Compiled programs are cached on disk for the session: many tests compile the same tiny model."""
import atexit
import importlib.metadata
import os
import shutil
import sys
import tempfile

# The test models are tiny, so compiling dominates the suite. The CPU backend's LLVM
# optimization is turned off, which halves it. On jaxlib 0.10 its older code emitters also take
# the suite from about 330 s to about 200 s on two cores (the flag is gone from 0.11, where
# naming it would abort). Neither changes what any test compares.
_flags = " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
try:
    if importlib.metadata.version("jaxlib").startswith("0.10."):
        _flags += " --xla_cpu_use_fusion_emitters=false"
except importlib.metadata.PackageNotFoundError:
    pass
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + _flags).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:       # the session's own, removed at exit
    _cache_dir = tempfile.mkdtemp(prefix="jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
