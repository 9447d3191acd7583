"""MoFO's fused CPU kernels: ``mofo_kernels.c``, compiled on first use and called through :mod:`ctypes`.

The kernels implement the selection driver's operations (:class:`~lit_mofo.optim._selection.BatchedKernels`) for a
whole batch of tensors per call: one pass over memory does what torch's operations do in five or six (the moment
update, the magnitude comparison and the masked parameter update, with the exact selection's candidates collected on
the way). The library has no dependency on torch's headers, so it compiles in about a second with the system C
compiler (``$CC``, else ``cc``/``gcc``/``clang``); it is cached under ``$LIT_MOFO_CACHE_DIR`` (default
``~/.cache/lit_mofo``), keyed by the source, the flags and the compiler, and loaded from there by later processes.
Nothing is compiled at import time or at install time: :func:`load` builds it when a MoFO step first asks for it,
and returns ``None`` (with the reason in :func:`unavailable_reason`) where there is no compiler, the build fails, or
``LIT_MOFO_FUSED=0`` is set.

**Instruction sets.** On x86-64 Linux the library is built for the best of three levels the CPU that loads it
supports, read from ``/proc/cpuinfo``: ``avx512`` (x86-64-v4: AVX-512 F/BW/CD/DQ/VL), ``avx2`` (x86-64-v3: AVX2, FMA,
F16C) or ``default`` (x86-64); each level is its own cached library, so a cache directory shared between machines
never hands a CPU instructions it lacks. ``LIT_MOFO_CPU_CAPABILITY=avx2`` (or ``default``) caps the level, like
torch's ``ATEN_CPU_CAPABILITY``. Elsewhere (ARM, macOS) the library is built with ``-march=native`` and keyed by the
CPU. Every level computes the same bits: the arithmetic is written out (``fmaf`` where torch fuses, nothing else
contracted), so the level only changes the speed.

The arithmetic follows torch's CPU kernels operation by operation (``lerp_`` and ``addcmul_`` as the fused
multiply-adds their vectorised paths compile to, ``sqrt``/``div``/``add_``/``addcdiv_`` for the step, every scalar
rounded to float32 first), compiled with ``-ffp-contract=off`` so that the compiler adds no contraction of its own.
The moments then match torch's bit for bit; the step may differ in the last bit where torch's ``sqrt`` is not
correctly rounded and the C one is. Parameters may be float32, bfloat16 or float16 (rounded to nearest-even once per
step), with an optional float32 master copy; the moments are always float32. Multi-threading uses OpenMP with
``torch.get_num_threads()`` threads, linked to the OpenMP runtime torch itself has loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

from lit_mofo.optim._selection import C_COLUMNS, M_COLUMNS, RADIX_ROUNDS, S_COLUMNS, Batch

__all__ = ["CAPABILITIES", "CpuKernels", "load", "load_seconds", "unavailable_reason"]

log = logging.getLogger(__name__)

_ABI_VERSION = 9
_SOURCE_NAME = "mofo_kernels.c"
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

# No flag that changes a result: -fno-math-errno and -fno-trapping-math only let the compiler vectorise sqrtf and
# the masked stores; -ffp-contract=off keeps it from fusing multiply-adds that torch does not fuse.
_BASE_FLAGS = [
    "-O3",
    "-std=gnu11",
    "-fPIC",
    "-shared",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
]
# x86-64 instruction-set levels, best first: (name, compiler flags, /proc/cpuinfo flags the CPU must have).
_AVX2 = frozenset({"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"})
CAPABILITIES: list[tuple[str, list[str], frozenset[str]]] = [
    (
        "avx512",
        ["-march=x86-64-v4", "-mprefer-vector-width=512"],
        _AVX2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
    ),
    ("avx2", ["-march=x86-64-v3"], _AVX2),
    ("default", [], frozenset()),
]

_I64 = ctypes.c_int64
_INT = ctypes.c_int
_PTR = ctypes.c_void_p


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False
        self.kernels: CpuKernels | None = None
        self.reason: str | None = None
        self.seconds = 0.0


_state = _State()


def _cache_dir() -> Path:
    configured = os.environ.get("LIT_MOFO_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lit_mofo"


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 Linux), None where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return set(value.split())
    except OSError:
        pass
    return None


def _cpu_signature() -> str:
    # -march=native code must not be loaded on a CPU with fewer instructions (a cache dir shared over NFS).
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("flags", "model name", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _builds() -> list[tuple[str, list[str], str]]:
    """The builds to try, best first: ``(instruction-set level, flags, extra cache key)``."""
    flags = _cpu_flags() if platform.machine().lower() in ("x86_64", "amd64") else None
    if flags is None:  # not x86-64 Linux: the build machine's own instructions, keyed by its CPU
        return [("native", ["-march=native"], _cpu_signature()), ("default", [], "")]
    cap = os.environ.get("LIT_MOFO_CPU_CAPABILITY", "").strip().lower()
    names = [name for name, _, _ in CAPABILITIES]
    if cap and cap not in names:
        log.warning("lit_mofo: LIT_MOFO_CPU_CAPABILITY=%r is not one of %s; ignored.", cap, names)
        cap = ""
    allowed = names[names.index(cap) :] if cap else names
    return [(name, extra, "") for name, extra, needs in CAPABILITIES if name in allowed and needs <= flags]


def _openmp_runtime_dir() -> str | None:
    # Link against the OpenMP runtime torch ships (same soname), so the process keeps a single thread pool.
    lib = Path(torch.__file__).parent / "lib"
    return str(lib) if any(lib.glob("libgomp*.so*")) or any(lib.glob("libomp*")) else None


def _source() -> str:
    return importlib.resources.files("lit_mofo.optim").joinpath(_SOURCE_NAME).read_text()


def _build(compiler: str) -> tuple[Path, str]:
    """The cached library for the best level that compiles (building it if needed), and that level's name."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = _source()
    cache = _cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=cache, delete=True)
        probe.close()
    except OSError:
        cache = Path(tempfile.gettempdir()) / f"lit_mofo_{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        cache.mkdir(parents=True, exist_ok=True)
    errors = []
    for level, extra, signature in _builds():
        for openmp in (["-fopenmp"], []):  # without OpenMP the kernels run on one thread
            flags = _BASE_FLAGS + extra + openmp
            key = hashlib.sha256(
                "\0".join([source, " ".join(flags), compiler, version, platform.machine(), signature]).encode()
            ).hexdigest()[:20]
            target = cache / f"mofo_kernels_{key}.so"
            if target.exists():
                return target, level
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                path = Path(tmp) / _SOURCE_NAME
                path.write_text(source)
                built = Path(tmp) / target.name
                command = [compiler, *flags, str(path), "-o", str(built), "-lm"]
                runtime = _openmp_runtime_dir() if openmp else None
                if runtime is not None:
                    command += [f"-L{runtime}", f"-Wl,-rpath,{runtime}"]
                result = subprocess.run(command, capture_output=True, text=True, timeout=300)
                if result.returncode != 0:
                    errors.append(f"{' '.join(extra + openmp) or 'no extra flags'}: {result.stderr.strip()[-400:]}")
                    continue
                os.replace(built, target)  # atomic: concurrent ranks may race to the same file
            return target, level
    raise RuntimeError("; ".join(errors))


def load() -> CpuKernels | None:
    """The fused CPU kernels, compiled on the first call of the process (or loaded from the cache); ``None``
    where they cannot be had, with the reason in :func:`unavailable_reason`. Never raises."""
    if _state.done:
        return _state.kernels
    with _state.lock:
        if _state.done:
            return _state.kernels
        start = time.perf_counter()
        try:
            if os.environ.get("LIT_MOFO_FUSED", "1").strip().lower() in ("0", "false", "no", "off"):
                raise RuntimeError("disabled by LIT_MOFO_FUSED=0")
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError("no C compiler found (set $CC, or install cc/gcc/clang)")
            path, level = _build(compiler)
            _state.kernels = CpuKernels(ctypes.CDLL(str(path)), level)
            log.debug("lit_mofo: fused MoFO CPU kernels (%s) loaded from %s", level, path)
        except Exception as err:  # any failure means: use torch operations
            _state.kernels = None
            _state.reason = f"{type(err).__name__}: {err}"
            log.info("lit_mofo: fused MoFO CPU kernels unavailable (%s); using torch operations.", _state.reason)
        _state.seconds = time.perf_counter() - start
        _state.done = True
    return _state.kernels


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` when it has not run or succeeded)."""
    return _state.reason


def load_seconds() -> float:
    """Wall time the process's first :func:`load` took: the compilation, or the load from the cache."""
    return _state.seconds


_NO_MEMORY = "MoFO's sample selection could not allocate its buffer (one float per sample entry)"


def _ptr(t: Tensor) -> int:
    if not t.is_contiguous():  # the driver's tables and buffers are; a temporary copy would be freed before the call
        raise ValueError("MoFO internal error: the C kernels need contiguous tensors")
    return t.data_ptr()


class CpuKernels:
    """The selection driver's operations as calls into the C library (one call per operation and batch).

    ``isa`` names the instruction-set level the library was built for (``avx512``, ``avx2``, ``default`` or
    ``native``); ``dtypes`` the parameter dtypes it steps.
    """

    name = "C kernels"
    block = 1 << 16  # unused: a C call loops over the whole batch itself
    fuses_sampling = True

    def __init__(self, lib: ctypes.CDLL, isa: str = "native") -> None:
        lib.mofo_abi_version.restype = _INT
        if lib.mofo_abi_version() != _ABI_VERSION:
            raise RuntimeError(f"stale kernel library (ABI {lib.mofo_abi_version()}, expected {_ABI_VERSION})")
        lib.mofo_table_layout.restype = _I64
        if lib.mofo_table_layout() != M_COLUMNS * 10000 + S_COLUMNS * 100 + C_COLUMNS:
            raise RuntimeError("the kernel library's table layout differs from lit_mofo.optim._selection's")
        self._lib = lib
        self.isa = isa
        self.dtypes = {torch.float32, torch.bfloat16} | ({torch.float16} if lib.mofo_has_f16() else set())
        lib.mofo_select_sample.argtypes = [_PTR, _I64, _PTR, _PTR, _I64, _PTR]
        lib.mofo_select_sample.restype = _INT
        lib.mofo_histogram_candidates.argtypes = [_PTR, _I64, _PTR, _PTR, _INT, _INT, _PTR, _PTR, _PTR]
        lib.mofo_histogram_candidates.restype = None
        lib.mofo_vectors.restype = ctypes.c_char_p
        self.vectors = lib.mofo_vectors().decode()  # the vector instructions the passes use
        self._fns: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] = {}
        signatures = {
            "sample": [_PTR, _PTR, _I64, _PTR, _PTR, _PTR],
            "moments_bracket": [_PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64],
            "histogram_range": [_PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _INT, _PTR, _PTR, _I64],
            "update": [_PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _INT, _I64],
            "fused": [_PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _INT, _I64],
            "sampled_bracket": [_PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64],
            "sampled_fused": [_PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _INT, _I64],
        }
        returns_status = ("moments_bracket", "update", "fused", "sampled_bracket", "sampled_fused")
        for dtype in self.dtypes:
            for name, argtypes in signatures.items():
                fn = getattr(lib, f"mofo_{name}_{_SUFFIX[dtype]}")
                fn.argtypes = argtypes
                fn.restype = _INT if name in returns_status else None
                self._fns[name, dtype] = fn

    def supports(self, param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, master: Tensor | None) -> bool:
        """Whether these (local, non-DTensor) tensors can take the fused kernels."""
        return (  # spelled out: this runs for every tensor at every step
            param.dtype in self.dtypes
            and grad.dtype == param.dtype
            and exp_avg.dtype == exp_avg_sq.dtype == torch.float32
            and param.is_cpu
            and grad.is_cpu
            and exp_avg.is_cpu
            and exp_avg_sq.is_cpu
            and not grad.is_sparse
            and param.is_contiguous()
            and grad.is_contiguous()
            and exp_avg.is_contiguous()
            and exp_avg_sq.is_contiguous()
            and (master is None or (master.dtype == torch.float32 and master.is_cpu and master.is_contiguous()))
        )

    @staticmethod
    def threads() -> int:
        return torch.get_num_threads()

    def _call(self, name: str, batch: Batch, *args: object) -> None:
        if self._fns[name, batch.dtype](*args):
            raise MemoryError(f"MoFO's C kernels could not allocate their per-thread counts ({name})")

    def sample(self, batch: Batch, out: Tensor) -> None:
        self._call("sample", batch, _ptr(batch.meta), _ptr(batch.scal), batch.size, _ptr(batch.param_base),
                   _ptr(batch.moment_base), _ptr(out))  # fmt: skip

    def select_sample(self, batch: Batch, samples: Tensor, ranks: Tensor) -> Tensor:
        ranks = ranks.contiguous()
        out = torch.zeros(ranks.shape, dtype=torch.float32)
        failed = self._lib.mofo_select_sample(
            _ptr(batch.meta), batch.size, _ptr(samples), _ptr(ranks), ranks.shape[1], _ptr(out)
        )
        if failed:
            raise MemoryError(_NO_MEMORY)
        return out

    def sampled_moments_bracket(self, batch: Batch, counts: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor]:
        """Sample, bracket and first pass of an unsharded batch in one call; returns the brackets ``(lo, hi)``."""
        samples = torch.empty(batch.sample_total, dtype=torch.float32)
        lo, hi = torch.empty(batch.size, dtype=torch.float32), torch.empty(batch.size, dtype=torch.float32)
        failed = self._fns["sampled_bracket", batch.dtype](
            _ptr(batch.meta), _ptr(batch.scal), batch.size, _ptr(batch.param_base), _ptr(batch.moment_base),
            _ptr(samples), _ptr(lo), _ptr(hi), _ptr(counts), _ptr(candidates), self.threads(),
        )  # fmt: skip
        if failed:
            raise MemoryError(_NO_MEMORY)
        return lo, hi

    def sampled_fused(self, batch: Batch, sample_rank: int, counts: Tensor) -> None:
        """Sample, threshold (the ``sample_rank``-th largest of each sample) and one-pass step of an unsharded batch."""
        samples = torch.empty(batch.sample_total, dtype=torch.float32)
        tau = torch.empty(batch.size, dtype=torch.float32)
        failed = self._fns["sampled_fused", batch.dtype](
            _ptr(batch.meta), _ptr(batch.scal), batch.size, _ptr(batch.param_base), _ptr(batch.moment_base),
            _ptr(samples), sample_rank, _ptr(tau), _ptr(counts), int(batch.has_master), self.threads(),
        )  # fmt: skip
        if failed:
            raise MemoryError(_NO_MEMORY)

    def moments_bracket(self, batch: Batch, lo: Tensor, hi: Tensor, counts: Tensor, candidates: Tensor) -> None:
        self._call("moments_bracket", batch, _ptr(batch.meta), _ptr(batch.scal), batch.size, _ptr(batch.param_base),
                   _ptr(batch.moment_base), _ptr(lo), _ptr(hi), _ptr(counts),
                   _ptr(candidates), self.threads())  # fmt: skip

    def histogram_candidates(
        self, batch: Batch, source: Tensor, prefix: Tensor, radix_round: int, counts: Tensor, candidates: Tensor,
        hist: Tensor,
    ) -> None:  # fmt: skip
        shift, width = RADIX_ROUNDS[radix_round]
        self._lib.mofo_histogram_candidates(_ptr(batch.meta), batch.size, _ptr(source),
                                            _ptr(prefix), shift, width, _ptr(counts), _ptr(candidates),
                                            _ptr(hist))  # fmt: skip

    def histogram_range(
        self, batch: Batch, source: Tensor, lo: Tensor, hi: Tensor, mode: Tensor, prefix: Tensor, radix_round: int,
        counts: Tensor, hist: Tensor,
    ) -> None:  # fmt: skip
        shift, width = RADIX_ROUNDS[radix_round]
        self._call("histogram_range", batch, _ptr(batch.meta), batch.size, _ptr(batch.param_base),
                   _ptr(batch.moment_base), _ptr(source), _ptr(lo), _ptr(hi),
                   _ptr(mode), _ptr(prefix), shift, width, _ptr(counts), _ptr(hist),
                   self.threads())  # fmt: skip

    def update(self, batch: Batch, tau: Tensor, counts: Tensor) -> None:
        self._call("update", batch, _ptr(batch.meta), _ptr(batch.scal), batch.size, _ptr(batch.param_base),
                   _ptr(batch.moment_base), _ptr(tau), _ptr(counts), int(batch.has_master),
                   self.threads())  # fmt: skip

    def fused(self, batch: Batch, tau: Tensor, counts: Tensor) -> None:
        self._call("fused", batch, _ptr(batch.meta), _ptr(batch.scal), batch.size, _ptr(batch.param_base),
                   _ptr(batch.moment_base), _ptr(tau), _ptr(counts), int(batch.has_master),
                   self.threads())  # fmt: skip
