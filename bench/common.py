"""Shared pieces of the speed benchmarks: shapes, inputs, the variants, the bytes model, timers.

``bench.speed`` (the command) and ``bench/test_speed.py`` (pytest-benchmark)
both build their optimizers here, through the public classes only, so the
Triton kernels are measured as soon as ``selopt.AdamW(backend="auto")`` picks
them for CUDA tensors.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import selopt
from bench.official_mofo import OfficialMoFO

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LR, WEIGHT_DECAY, FRACTION = 1e-4, 1e-2, 0.15
MOFO_BLOCK_SIZES = (1024, 4096)

# ---------------------------------------------------------------- devices


def slug(text: str) -> str:
    """A filesystem-safe lower-case name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> list[float] | None:
    """Host load over 1/5/15 min: CPU timings on a shared machine are only as good as this is low."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def device_full_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    """Name of the results file: the CUDA device name, or ``cpu-<model>``."""
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return "cpu-" + slug(cpu_model())


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 of a GPU or the last cache level of the CPU (32 MiB when it cannot be read)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    for entry in os.listdir(base) if os.path.isdir(base) else []:
        try:
            with open(f"{base}/{entry}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=32 << 20)


def memory_budget_bytes(device: torch.device, share: float = 0.6) -> int:
    """Bytes the benchmark may fill with params, grads and optimizer state."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * share)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * share)
    except OSError:
        pass
    return 4 << 30


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def keep_freed_memory_mapped() -> bool:
    """Make glibc keep freed blocks in the process instead of returning them to the OS.

    By default glibc serves big blocks with mmap and unmaps them on free, so a
    step that allocates temporaries (torch's foreach and for-loop AdamW, the
    reference backend, the official MoFO loop) pays page faults for every one
    of them, depending on which variant ran before and on how the heap was
    trimmed, so a step's time depends on the run order (bench/NOTES.md §1 has
    the figures). With mmap off and trimming at 2 GiB, the steady state is what
    a CPU training job with jemalloc/tcmalloc sees. Returns False where this is
    not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def selopt_backend(device: torch.device) -> str:
    """What ``backend="auto"`` resolves to for tensors on ``device``."""
    return "triton" if device.type == "cuda" and triton_version() is not None else "torch"


# ---------------------------------------------------------------- shapes


@dataclass(frozen=True)
class LlamaDims:
    """Decoder dimensions; the defaults are Llama-2-7B's (MHA: q/k/v/o are all hidden x hidden)."""

    hidden: int = 4096
    intermediate: int = 11008
    heads: int = 32
    vocab: int = 32000


LLAMA2_7B = LlamaDims()
# A Llama-shaped model small enough for CI: exercises the list path and HFT in seconds.
LLAMA_MINI = LlamaDims(hidden=64, intermediate=172, heads=4, vocab=256)

Shapes = list[tuple[str, tuple[int, ...]]]


def single_tensor_shapes(numel: int) -> Shapes:
    """One weight matrix of ``numel`` entries, in rows of 4096 like a 7B model's (a vector if it does not divide)."""
    columns = 4096 if numel % 4096 == 0 else numel
    return [("weight", (numel // columns, columns))]


def llama_shapes(layers: int, dims: LlamaDims = LLAMA2_7B, embeddings: bool = True) -> Shapes:
    """Hugging Face names and shapes of a Llama decoder's parameters."""
    h, f = dims.hidden, dims.intermediate
    shapes: Shapes = [("model.embed_tokens.weight", (dims.vocab, h))] if embeddings else []
    for i in range(layers):
        prefix = f"model.layers.{i}."
        shapes += [(f"{prefix}self_attn.{name}_proj.weight", (h, h)) for name in "qkvo"]
        shapes += [(f"{prefix}mlp.gate_proj.weight", (f, h)), (f"{prefix}mlp.up_proj.weight", (f, h))]
        shapes += [(f"{prefix}mlp.down_proj.weight", (h, f))]
        shapes += [(f"{prefix}input_layernorm.weight", (h,)), (f"{prefix}post_attention_layernorm.weight", (h,))]
    if embeddings:
        shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (dims.vocab, h))]
    return shapes


def llama_layer_numel(dims: LlamaDims = LLAMA2_7B) -> int:
    return sum(math.prod(shape) for _, shape in llama_shapes(1, dims, embeddings=False))


def hft_trainable(names: list[str], params: list[Tensor], seed: int = 0) -> list[bool]:
    """Which tensors train under ``selopt.hft.freeze_half`` (the library's own draw) on these names.

    The tensors are hung on a module tree that mirrors their dotted names, so
    the draw sees exactly what it would see on a Hugging Face Llama.
    """
    root = torch.nn.Module()
    for name, param in zip(names, params):
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, param)
    selopt.hft.freeze_half(root, seed=seed)
    return [bool(p.requires_grad) for p in params]


# ---------------------------------------------------------------- cases and inputs


@dataclass
class Case:
    """One benchmarked parameter list: a single tensor or a Llama-shaped list, in one dtype."""

    name: str
    dtype_name: str
    shapes: Shapes

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def is_model(self) -> bool:
        return self.name != "single"


@dataclass
class InputSet:
    """One copy of the params and their grads; several are cycled so no step runs out of cache."""

    params: list[Tensor]
    grads: list[Tensor]


def resident_bytes_per_element(dtype: torch.dtype) -> int:
    """Memory per element while a variant runs: param + grad + two fp32 moments."""
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * size + 8


def rotation_copies(case: Case, device: torch.device, budget_bytes: int, max_copies: int) -> int:
    """Copies to cycle: enough that all of them together span 4x the last-level cache, within memory."""
    set_bytes = case.numel * resident_bytes_per_element(case.dtype)
    wanted = math.ceil(4 * last_level_cache_bytes(device) / max(set_bytes, 1))
    affordable = budget_bytes // max(set_bytes, 1)
    return max(1, min(wanted, affordable, max_copies))


def make_inputs(case: Case, device: torch.device, copies: int, seed: int = 0) -> list[InputSet]:
    generator = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(copies):
        params, grads = [], []
        for _, shape in case.shapes:
            params.append(
                torch.nn.Parameter(0.02 * torch.randn(shape, device=device, dtype=case.dtype, generator=generator))
            )
            grads.append(1e-3 * torch.randn(shape, device=device, dtype=case.dtype, generator=generator))
        sets.append(InputSet(params, grads))
    return sets


# ---------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    name: str
    block_size: int | None = None

    @property
    def label(self) -> str:
        return self.name if self.block_size is None else f"{self.name}[{self.block_size}]"

    @property
    def is_selopt(self) -> bool:
        return self.name.startswith("selopt_")


def variants_for(device: torch.device) -> list[Variant]:
    """The benchmarked variants; the for-loop torch AdamW only on CPU (on GPU it is never a contender)."""
    names = ["torch_adamw_fused", "torch_adamw_foreach"]
    if device.type == "cpu":
        names.append("torch_adamw_forloop")
    names += ["official_mofo", "selopt_adamw"]
    found = [Variant(n) for n in names]
    found += [Variant("selopt_mofo_block", b) for b in MOFO_BLOCK_SIZES]
    found += [Variant(n) for n in ("selopt_mofo_exact", "selopt_hft", "selopt_softmask")]
    return found


def element_bytes(param_dtype: torch.dtype, moment_dtype: torch.dtype) -> int:
    """Bytes one AdamW step moves per element: p read+write, g read, m read+write, v read+write.

    28 for fp32; 22 for bf16 params/grads with fp32 moments; 14 for torch's
    bf16 AdamW, which keeps bf16 moments for bf16 params.
    """
    p = torch.empty((), dtype=param_dtype).element_size()
    m = torch.empty((), dtype=moment_dtype).element_size()
    return 2 * p + p + 2 * m + 2 * m


def moment_dtype_of(variant: Variant, param_dtype: torch.dtype) -> torch.dtype:
    if variant.name.startswith("torch_"):
        return param_dtype  # torch.optim.AdamW: zeros_like(param)
    return selopt.state.moment_dtype(param_dtype, None)  # fp32 for bf16, as the official MoFO code


@dataclass
class Prepared:
    """Ready-to-time steps of one variant on every input copy, and what one step moves."""

    steps: list[Callable[[], None]]
    bytes_per_step: int
    numel_stepped: int
    tensors_stepped: int
    optimizers: list[torch.optim.Optimizer]


def _groups(params: list[Tensor], matrix_options: dict, vector_options: dict) -> list[dict]:
    # As the official MoFO code and selopt.param_groups: matrices get decay and
    # selection, vectors (norms) are dense with no decay.
    matrices = [p for p in params if p.dim() >= 2]
    vectors = [p for p in params if p.dim() < 2]
    groups = [{"params": matrices, **matrix_options}] if matrices else []
    return groups + ([{"params": vectors, **vector_options}] if vectors else [])


def build_optimizer(variant: Variant, params: list[Tensor]) -> torch.optim.Optimizer:
    """The optimizer of ``variant`` over ``params`` (grads already attached)."""
    name = variant.name
    if name.startswith("torch_adamw_"):
        mode = name.removeprefix("torch_adamw_")
        flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "forloop": dict(foreach=False)}[mode]
        groups = _groups(params, {"weight_decay": WEIGHT_DECAY}, {"weight_decay": 0.0})
        return torch.optim.AdamW(groups, lr=LR, **flags)
    if name == "official_mofo":
        groups = _groups(params, {"weight_decay": WEIGHT_DECAY}, {"weight_decay": 0.0, "fraction": None})
        return OfficialMoFO(groups, lr=LR, fraction=FRACTION)
    if name in ("selopt_adamw", "selopt_hft", "selopt_softmask"):
        groups = _groups(params, {"weight_decay": WEIGHT_DECAY}, {"weight_decay": 0.0})
        opt = selopt.AdamW(groups, lr=LR, backend="auto")
        if name == "selopt_softmask":
            generator = torch.Generator(device=params[0].device).manual_seed(1)
            for p in params:
                if p.dim() >= 2:  # CoFiTune scales output rows of weight matrices
                    opt.set_soft_mask(p, torch.rand(p.shape[0], device=p.device, generator=generator))
        return opt
    if name in ("selopt_mofo_block", "selopt_mofo_exact"):
        groups = _groups(params, {"weight_decay": WEIGHT_DECAY}, {"weight_decay": 0.0, "fraction": 1.0})
        return selopt.MoFO(groups, lr=LR, fraction=FRACTION, block_size=variant.block_size, backend="auto")
    raise ValueError(f"unknown variant {name!r}")


def prepare(variant: Variant, case: Case, inputs: list[InputSet]) -> Prepared:
    """Attach grads (none on HFT's frozen half) and build one optimizer per input copy."""
    names = [name for name, _ in case.shapes]
    if variant.name == "selopt_hft":
        trainable = hft_trainable(names, inputs[0].params)
    else:
        trainable = [True] * len(names)
    optimizers, steps = [], []
    for inputs_set in inputs:
        for p, g, train in zip(inputs_set.params, inputs_set.grads, trainable):
            p.requires_grad_(train)
            p.grad = g if train else None
        opt = build_optimizer(variant, inputs_set.params)
        optimizers.append(opt)
        steps.append(opt.step)
    per_element = element_bytes(case.dtype, moment_dtype_of(variant, case.dtype))
    stepped = [p for p, train in zip(inputs[0].params, trainable) if train]
    numel = sum(p.numel() for p in stepped)
    mask_bytes = sum(p.shape[0] * 4 for p in stepped if p.dim() >= 2) if variant.name == "selopt_softmask" else 0
    return Prepared(steps, numel * per_element + mask_bytes, numel, len(stepped), optimizers)


# ---------------------------------------------------------------- timing


@dataclass
class Timing:
    times_ms: list[float]
    host_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def host_median_ms(self) -> float:
        return statistics.median(self.host_ms)


def time_steps(
    steps: list[Callable[[], None]], device: torch.device, repeats: int, max_seconds: float, min_repeats: int = 3
) -> Timing:
    """Time one step at a time, cycling through ``steps`` (one per input copy).

    Warm-up runs every copy once (optimizer state, Triton compilation) and the
    first once more, so the timed steps are steady-state ones. On CUDA each
    step is bracketed by events, so its time is the GPU's, launch gaps
    included; on CPU it is the wall time of the ``step()`` call. The host time
    is the CPU time the calling thread spends in ``step()`` (launching, on
    CUDA): unlike wall time it does not grow while other jobs hold the cores,
    and with one torch thread it is the whole cost of a CPU step.
    Stops after ``repeats`` steps, or after ``max_seconds`` once ``min_repeats``
    are done.
    """
    for fn in steps + steps[:1]:
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        events = []
    wall, host = [], []
    started = time.perf_counter()
    for i in range(repeats):
        fn = steps[i % len(steps)]
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        host.append((time.thread_time() - c0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
        if cuda:
            end.record()
            events.append((begin, end))
            # Stay at most two steps ahead of the GPU: the queue never drains (so no
            # launch gap is timed), yet max_seconds still bounds slow variants.
            if len(events) > 2:
                events[-3][1].synchronize()
        if i + 1 >= min_repeats and time.perf_counter() - started > max_seconds:
            break
    if cuda:
        torch.cuda.synchronize(device)
        times = [begin.elapsed_time(end) for begin, end in events]
    else:
        times = wall
    return Timing(times, host)


def copy_bandwidth_gbps(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the bytes read and the bytes written."""
    n = nbytes // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    timing = time_steps([lambda: dst.copy_(src)], device, repeats, max_seconds=10.0)
    del src, dst
    release_memory(device)
    return 2 * n * 4 / (timing.median_ms * 1e-3) / 1e9


def torch_fused_available(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether ``torch.optim.AdamW(fused=True)`` steps tensors of ``dtype`` on ``device``, and why not."""
    p = torch.nn.Parameter(torch.zeros(8, device=device, dtype=dtype))
    p.grad = torch.ones_like(p)
    try:
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, ValueError, NotImplementedError) as error:
        return False, f"{type(error).__name__}: {error}"
    return True, ""
