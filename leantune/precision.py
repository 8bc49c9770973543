"""Which precision a run computes in: the fastest exact-enough one for the device it runs on.

CPUs differ by a factor of ~200 in bf16: an AVX2-only x86 core has no bf16 arithmetic, so torch converts
every element and a bf16 GEMM runs ~75x slower than fp32 (bench/gemm.py, 576 -> 1536, 2 threads: 1.2 vs
86 GFLOP/s), while a core with AVX512_BF16 or AMX computes bf16 natively and runs it faster than fp32 (~2.8x
on an AVX512_BF16 EPYC; 5.9x on a 2-core Xeon with AMX-BF16: 1502 vs 253 GFLOP/s).
`--dtype auto` therefore picks

- CUDA: bf16 (fp32 on a card without bf16);
- a CPU with native bf16 (AVX512_BF16 or AMX-BF16): bf16;
- any other CPU: fp32.

"bf16" means what torch.autocast means on CUDA: the frozen base is stored and multiplied in bf16 (a
4-bit base decodes to bf16), while trainable parameters, the optimizer state and the loss stay fp32.
`--dtype fp32|bf16` forces one. `leantune.precision.report()` says what this machine has.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

DTYPE_NAMES = {"auto": None, "fp32": torch.float32, "float32": torch.float32,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# /proc/cpuinfo and torch.cpu.get_capabilities() both name them so
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    name: str  # "AMD EPYC 9B14", "Intel(R) Xeon(R) Platinum 8481C"
    capability: str  # the kernels torch dispatches to: "AVX2", "AVX512", ...
    flags: frozenset[str]
    threads: int  # torch's intra-op threads

    @property
    def bf16_flags(self) -> list[str]:
        """The flags that make bf16 native here (empty: it is emulated)."""
        return [f for f in NATIVE_BF16_FLAGS if f in self.flags]

    @property
    def native_bf16(self) -> bool:
        return bool(self.bf16_flags)

    def as_dict(self) -> dict:
        return {"cpu": self.name, "capability": self.capability, "native_bf16": self.native_bf16,
                "bf16_flags": sorted(self.bf16_flags), "threads": self.threads}

    def describe(self) -> str:
        bf16 = (f"native bf16 ({', '.join(self.bf16_flags)})"
                if self.native_bf16 else "no native bf16 (bf16 matmuls emulated, far slower than fp32)")
        return f"{self.name}, {self.capability}, {bf16}, {self.threads} threads"


def _proc_cpuinfo() -> tuple[str | None, set[str]]:
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name is None:
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux
        pass
    return name, flags


@functools.lru_cache(maxsize=1)
def _cpu_static() -> tuple[str, str, frozenset[str]]:
    name, flags = _proc_cpuinfo()
    try:  # torch's own CPUID reading; covers machines without /proc/cpuinfo
        caps = torch.cpu.get_capabilities()
        flags |= {k for k, v in caps.items() if v is True}
        name = name or caps.get("cpu_name")
    except (AttributeError, RuntimeError):
        pass
    import platform

    return name or platform.processor() or "unknown CPU", torch.backends.cpu.get_cpu_capability(), frozenset(flags)


def cpu_info() -> CpuInfo:
    """This machine's CPU as far as precision is concerned (CPUID is read once per process).

    LEANTUNE_CPU_BF16=1 (or 0) overrides the bf16 detection: the suite can then run the rules of a
    native-bf16 CPU on any CPU (the numerics are the same; only the speed differs)."""
    name, capability, flags = _cpu_static()
    forced = os.environ.get("LEANTUNE_CPU_BF16")
    if forced in ("0", "1"):
        flags = (flags | {"avx512_bf16"}) if forced == "1" else (flags - set(NATIVE_BF16_FLAGS))
        name = f"{name} [LEANTUNE_CPU_BF16={forced}]"
    return CpuInfo(name, capability, frozenset(flags), torch.get_num_threads())


@functools.lru_cache(maxsize=1)
def native_bf16_cpu() -> bool:
    """Does this CPU compute bf16 natively? (Asked per layer per step by LoRA's "auto" rule: cached.)"""
    return cpu_info().native_bf16


@dataclass(frozen=True)
class Precision:
    """The dtype the frozen base is stored and multiplied in on `device`, and why it was chosen."""

    dtype: torch.dtype
    device: str
    reason: str

    @property
    def name(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    @property
    def quant_compute_dtype(self) -> torch.dtype | None:
        """What a 4-bit base decodes to: this dtype, or None (the layer's own default) in fp32."""
        return None if self.dtype == torch.float32 else self.dtype

    def describe(self) -> str:
        extra = ("; trainable parameters, optimizer state and the loss in fp32" if self.dtype != torch.float32
                 else "")
        return f"precision: {self.name} on {self.device} ({self.reason}){extra}"


def parse_dtype(name: str, option: str = "--dtype") -> torch.dtype | None:
    """'auto' -> None, 'fp32'/'float32' -> torch.float32, 'bf16'/'bfloat16' -> torch.bfloat16."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"{option} must be auto, fp32 or bf16, got {name!r}")
    return DTYPE_NAMES[name]


def resolve_precision(dtype: str = "auto", device: str = "cpu", cpu: CpuInfo | None = None,
                      full_weights: str | None = None) -> Precision:
    """The precision for `--dtype dtype` on `device` ("cpu", "cuda", "cuda:1"); `cpu` defaults to this one.

    `full_weights` names the option that trains base weights in full (e.g. "--reinit-top"): those need
    fp32 weights (leantune keeps no separate fp32 master copy of a bf16 weight), so auto picks fp32 and
    a forced bf16 is refused."""
    p = _resolve(dtype, device, cpu)
    if full_weights and p.dtype != torch.float32:
        if dtype != "auto":
            raise ValueError(f"{full_weights} trains base weights in full, which needs fp32 weights; "
                             f"drop --dtype {dtype} (auto picks fp32 then) or pass --dtype fp32")
        return Precision(torch.float32, device, f"auto: {full_weights} trains base weights in full, in fp32")
    return p


def _resolve(dtype: str, device: str, cpu: CpuInfo | None) -> Precision:
    forced = parse_dtype(dtype)
    kind = torch.device(device).type
    if kind == "cpu":
        cpu = cpu or cpu_info()
        if forced is not None:
            slow = forced == torch.bfloat16 and not cpu.native_bf16
            return Precision(forced, device, f"--dtype {dtype}" + (
                "; this CPU has no native bf16, so its bf16 matmuls are emulated and far slower than fp32"
                if slow else ""))
        if cpu.native_bf16:
            return Precision(torch.bfloat16, device, f"auto: {cpu.name} computes bf16 natively "
                             f"({', '.join(cpu.bf16_flags)})")
        return Precision(torch.float32, device, f"auto: {cpu.name} has no AVX512_BF16/AMX, so bf16 would be "
                         "emulated and far slower than fp32")
    if forced is not None:
        return Precision(forced, device, f"--dtype {dtype}")
    if kind == "cuda" and not torch.cuda.is_bf16_supported():
        return Precision(torch.float32, device, "auto: this GPU has no bf16")
    return Precision(torch.bfloat16, device, f"auto: {kind} computes bf16 natively")


def resolve_device(device: str = "auto") -> str:
    """--device as torch names it: auto is cuda when torch sees a GPU, else cpu. A device that is not cpu or
    cuda[:N], or a cuda one on a machine where torch sees none, is refused here, before any weight is read."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
        raise ValueError(f"--device {device!r}: use cpu, cuda, cuda:N or auto")
    if kind == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n <= int(index or 0):
            raise ValueError(f"--device {device}: torch {torch.__version__} sees {n} CUDA device(s); use --device "
                             "cpu (or auto), or install a CUDA build of torch on a machine with a GPU")
    return device


def report() -> str:
    """Two lines on this machine's CPU and what --dtype auto picks on it (CI prints them first)."""
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"cpu: {cpu_info().describe()}\n"
            f"torch {torch.__version__}; --dtype auto on cpu -> {resolve_precision('auto', 'cpu').name}"
            + (f"; OMP_NUM_THREADS={threads}" if threads else ""))
