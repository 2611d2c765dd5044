"""Compile every kernel specialization selopt can launch for real NVIDIA and AMD GPUs, with no GPU.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU but
enforces none of the compiler's rules, so a kernel green under it can still
fail to compile for a GPU. This module closes that gap: :func:`compile_only`
makes Triton's active driver a stand-in that reports a GPU target and turns
every launch into a compile, and :func:`main` drives the library's own
:func:`~selopt.kernels.multi_tensor_adamw_` on CPU tensors through a matrix of
configurations. Each kernel is therefore compiled with exactly the constexprs
and argument specialization a real launch has: to SASS by ptxas for an NVIDIA
target (``80``, ``sm_90``), to an AMDGCN code object by the ``ld.lld`` in the
Triton wheel for an AMD Instinct one (``gfx942``: MI300X/MI325X, ``gfx90a``:
MI250X). On ROCm torch calls an AMD GPU ``cuda``, so ``backend="auto"`` sends
an MI300X user to these same kernels.

Run it with ``TRITON_INTERPRET`` unset::

    python -m selopt.kernels.compile_check --arch 80 90 gfx942 --quick-arch 100 120 gfx90a

It exits non-zero if any kernel fails, naming the kernel, the configuration
and the innermost compiler error.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from selopt import quantization
from selopt.bucket import Bucket
from selopt.kernels import block, launch
from selopt.kernels.adamw import multi_tensor_adamw_, prepare_adamw
from selopt.kernels.launch import KernelCompileError
from selopt.options import AdamWOptions


# The AMD targets checked, with their wavefront size: CDNA runs 64 lanes per wavefront, where
# Triton's warp is the wavefront (RDNA's 32-lane wavefronts are not a selopt target).
AMD_WAVEFRONTS = {"gfx90a": 64, "gfx942": 64}


def gpu_target(arch: int | str) -> GPUTarget:
    """The Triton target of ``arch``: an NVIDIA compute capability (``90``, ``"90"``, ``"sm_90"``) or an
    AMD architecture of :data:`AMD_WAVEFRONTS` (``"gfx942"``).

    Example:
        >>> gpu_target("sm_90")
        GPUTarget(backend='cuda', arch=90, warp_size=32)
        >>> gpu_target("gfx942")
        GPUTarget(backend='hip', arch='gfx942', warp_size=64)
    """
    text = str(arch).lower()
    if text in AMD_WAVEFRONTS:
        return GPUTarget("hip", text, AMD_WAVEFRONTS[text])
    capability = text.removeprefix("sm_")
    if not capability.isdigit():
        raise ValueError(f"arch {arch!r} is neither a compute capability (80, sm_90) nor an AMD target "
                         f"({', '.join(AMD_WAVEFRONTS)})")
    return GPUTarget("cuda", int(capability), 32)


def target_name(target: GPUTarget) -> str:
    """How reports name ``target``: ``sm_90``, ``gfx942``.

    Example:
        >>> target_name(gpu_target(90)), target_name(gpu_target("gfx90a"))
        ('sm_90', 'gfx90a')
    """
    return f"sm_{target.arch}" if target.backend == "cuda" else target.arch


class CompileOnlyDriver(DriverBase):
    """Triton driver that reports ``target`` and owns no device: kernels compile, nothing launches."""

    def __init__(self, target: GPUTarget):
        super().__init__()
        self.target = target

    @classmethod
    def is_active(cls) -> bool:
        return False  # never picked by Triton itself; only installed by compile_only()

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("the compile-only driver builds no launcher")

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("the compile-only driver cannot time kernels")

    def get_current_device(self) -> str:
        # Triton keeps its compiled kernels per device: one key per target keeps them apart.
        return f"compile-only-{target_name(self.target)}"

    def get_current_stream(self, device) -> int:
        return 0


@dataclass(frozen=True)
class Compiled:
    """One compiled specialization: the kernel's name, its launch options and Triton's ``CompiledKernel``
    (``binary.metadata``; ``binary.asm["cubin"]`` and ``["ptx"]`` for NVIDIA, ``["amdgcn"]`` and ``["hsaco"]``
    for AMD)."""

    name: str
    options: dict
    binary: object


@contextlib.contextmanager
def compile_only(arch: int | str) -> Iterator[list]:
    """Within the block, launches compile for ``arch`` (as :func:`gpu_target` reads it) instead of running.

    Yields the list of :class:`Compiled` kernels, one per distinct specialization.

    Example (``TRITON_INTERPRET`` unset):
        >>> p = torch.zeros(10)
        >>> with compile_only(90) as compiled:
        ...     multi_tensor_adamw_(Bucket([p], [p.clone()], [p.clone()], [p.clone()], [torch.zeros(())]),
        ...                         AdamWOptions())
        >>> [(c.name, c.options.get("BLOCK")) for c in compiled]
        [('_step_scalars_kernel', None), ('_block_adamw_kernel', 4096)]
    """
    compiled: list[Compiled] = []
    jit_run = JITFunction.run

    def run_as_compile(self, *args, grid, warmup, **kwargs):
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        if all(kernel is not seen.binary for seen in compiled):
            constexprs = {p.name: kwargs[p.name] for p in self.params if p.is_constexpr and p.name in kwargs}
            compiled.append(Compiled(self.fn.__name__, {**constexprs, "num_warps": kwargs.get("num_warps")}, kernel))
        return kernel

    # Read the private slot, not driver.active: on a machine without a GPU the public property
    # tries to create a CUDA driver and raises.
    previous = driver._active
    driver.set_active(CompileOnlyDriver(gpu_target(arch)))
    JITFunction.run = run_as_compile
    try:
        yield compiled
    finally:
        JITFunction.run = jit_run
        driver._active = previous


@dataclass(frozen=True)
class Configuration:
    """One call of ``multi_tensor_adamw_``: a bucket of tensors and the step's options."""

    name: str
    block_size: int | None
    fraction: float = 0.25
    param_dtype: torch.dtype = torch.float32
    moment_dtype: torch.dtype = torch.float32
    tensors: int = 16
    options: frozenset = field(default_factory=frozenset)
    # Shards of larger tensors (selopt.distributed on the kernels): k over the whole tensor and a
    # histogram exchange between the radix rounds.
    sharded: bool = False
    # 8-bit moments (moment_dtype torch.uint8): entries per scale, a constexpr of the kernels.
    quant_block: int = 0


# The paths the dispatcher can take: dense, every one-pass block size, the exact path per tensor
# and over segments longer than the largest one-pass block.
PATHS = {
    "dense": (None, 1.0),
    **{f"block {size}": (size, 0.25) for size in (2**i for i in range(block.MAX_BLOCK.bit_length()))},
    "exact": (None, 0.25),
    "exact segments": (2 * block.MAX_BLOCK, 0.25),
}
DTYPE_PAIRS = [(p, m) for p in (torch.float32, torch.bfloat16, torch.float16) for m in (torch.float32, torch.bfloat16)]
OPTIONS = ("amsgrad", "maximize", "decay_selected", "soft_mask_rows_update", "soft_mask_rows_grad",
           "soft_mask_full_update", "soft_mask_full_grad", "lr_on_device", "grad_scale", "found_inf",
           "stochastic_rounding", "selections", "beta1_below_half")


# 8-bit moments: the largest and the smallest quant block, and the options they allow (amsgrad keeps
# no 8-bit state; a selection block holds whole quant blocks).
# The one-pass blocks between the smallest and the largest differ in BLOCK alone, which the fp32 rows
# already cover: the 8-bit rows take the ends.
EIGHT_BIT_BLOCKS = (quantization.QUANT_BLOCK, quantization.MIN_QUANT_BLOCK)
EIGHT_BIT_PATHS = ["dense", f"block {quantization.QUANT_BLOCK}", f"block {block.MAX_BLOCK}", "exact", "exact segments"]


def configurations(quick: bool = False) -> list[Configuration]:
    """Every path with defaults; each dtype pair, all options together and a one-tensor bucket on the
    main paths; each option alone on the two selection kernels (block and exact). With 8-bit moments:
    every path they allow, with fp32 and bf16 params and each end of the quant block's range, and
    all the options they allow together on the main paths.

    ``quick``: every path, and all options together on the main paths (8-bit moments too).
    """
    configs = [Configuration(path, *PATHS[path]) for path in PATHS]
    configs.append(Configuration("exact sharded", *PATHS["exact"], sharded=True))
    main_paths = ("dense", "block 1024", f"block {block.MAX_BLOCK}", "exact")
    for path in main_paths:
        size, fraction = PATHS[path]
        for param_dtype, moment_dtype in ((torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)):
            for soft_mask in ("rows", "full"):
                every = frozenset(o for o in OPTIONS if not o.startswith("soft_mask")) | {f"soft_mask_{soft_mask}_update"}
                configs.append(Configuration(f"{path} all options ({soft_mask} mask) {param_dtype}/{moment_dtype}",
                                             size, fraction, param_dtype, moment_dtype, options=every))
        if quick:
            continue
        for param_dtype, moment_dtype in DTYPE_PAIRS:
            configs.append(Configuration(f"{path} {param_dtype} params, {moment_dtype} moments", size, fraction,
                                         param_dtype, moment_dtype))
        configs.append(Configuration(f"{path} one tensor", size, fraction, tensors=1))
    for path in EIGHT_BIT_PATHS:
        size, fraction = PATHS[path]
        for param_dtype in (torch.float32,) if quick else (torch.float32, torch.bfloat16):
            for quant_block in EIGHT_BIT_BLOCKS[:1] if quick else EIGHT_BIT_BLOCKS:
                configs.append(Configuration(f"{path} 8-bit moments (block {quant_block}), {param_dtype} params",
                                             size, fraction, param_dtype, torch.uint8, quant_block=quant_block))
    every_8bit = frozenset(o for o in OPTIONS if not o.startswith("soft_mask") and o != "amsgrad")
    for path in main_paths:
        size, fraction = PATHS[path]
        configs.append(Configuration(f"{path} 8-bit moments, all options", size, fraction, torch.bfloat16,
                                     torch.uint8, options=every_8bit | {"soft_mask_rows_update"},
                                     quant_block=quantization.QUANT_BLOCK))
    configs.append(Configuration("exact sharded 8-bit moments", *PATHS["exact"], moment_dtype=torch.uint8,
                                 sharded=True, quant_block=quantization.QUANT_BLOCK))
    for path in () if quick else ("block 1024", "exact"):
        size, fraction = PATHS[path]
        for option in OPTIONS:
            param_dtype = torch.bfloat16 if option == "stochastic_rounding" else torch.float32
            configs.append(Configuration(f"{path} {option}", size, fraction, param_dtype,
                                         options=frozenset({option})))
    return configs


def run_configuration(config: Configuration) -> None:
    """Call ``multi_tensor_adamw_`` on CPU tensors for ``config`` (under :func:`compile_only`, a compile)."""
    opts = config.options
    # 5200 entries: more than one dense tile and exact chunk, not a multiple of either; with 8-bit
    # moments rows of 5 quant blocks.
    shape = (40, 5 * config.quant_block if config.quant_block else 130)
    params = [torch.zeros(shape, dtype=config.param_dtype) for _ in range(config.tensors)]
    state = [[torch.zeros(shape, dtype=config.moment_dtype) for _ in params] for _ in range(3)]
    scales = None
    if config.quant_block:
        scales = [[torch.zeros(quantization.scales_shape(shape, config.quant_block)) for _ in params]
                  for _ in range(2)]
    soft_masks = None
    for rows_or_full in ("rows", "full"):
        for mode in ("update", "grad"):
            if f"soft_mask_{rows_or_full}_{mode}" in opts:
                soft_masks = [torch.ones(shape[:1] if rows_or_full == "rows" else shape) for _ in params]
                soft_mask_mode = mode
    options = AdamWOptions(
        lr=torch.tensor(1e-3) if "lr_on_device" in opts else 1e-3,
        betas=(0.3 if "beta1_below_half" in opts else 0.9, 0.999), eps=1e-8, weight_decay=0.01,
        amsgrad="amsgrad" in opts, maximize="maximize" in opts, fraction=config.fraction,
        block_size=config.block_size, decay="selected" if "decay_selected" in opts else "all",
        soft_mask_mode=soft_mask_mode if soft_masks else "update", stochastic_rounding="stochastic_rounding" in opts,
    )
    bucket = Bucket(
        params, [torch.zeros_like(p) for p in params], state[0], state[1], [torch.zeros(()) for _ in params],
        max_exp_avg_sqs=state[2] if options.amsgrad else None, soft_masks=soft_masks,
        rounding_seeds=[torch.zeros((), dtype=torch.int64) for _ in params] if options.stochastic_rounding else None,
        selections=[torch.zeros(shape, dtype=torch.bool) for _ in params] if "selections" in opts else None,
        exp_avg_scales=scales and scales[0], exp_avg_sq_scales=scales and scales[1])
    step = dict(grad_scale=torch.tensor(1.0) if "grad_scale" in opts else None,
                found_inf=torch.tensor(0.0) if "found_inf" in opts else None)
    if config.sharded:
        prepare_adamw(bucket, options, **step, whole_numels=[2 * p.numel() for p in params],
                      combine=lambda counts: None)()
    else:
        multi_tensor_adamw_(bucket, options, **step)


def check_arch(arch: int | str, only: str = "", quick: bool = False) -> tuple[list[str], str]:
    """Compile every configuration (``quick``: :func:`configurations`' short list) whose name
    contains ``only`` for ``arch`` (``90``, ``"gfx942"``).

    Returns (one message per failure, the report). Uses a fresh Triton cache:
    Triton's cache key ignores ``TRITON_ALLOW_NON_CONSTEXPR_GLOBALS``, so a cached
    binary could hide a kernel that no longer compiles under the strict default
    enforced here.
    """
    name = target_name(gpu_target(arch))
    triton.knobs.cache.dir = tempfile.mkdtemp(prefix=f"selopt-compile-check-{name}-")
    triton.knobs.compilation.allow_non_constexpr_globals = False
    configs = [c for c in configurations(quick) if only in c.name]
    failures, start, kernels = [], time.perf_counter(), 0
    for config in configs:
        try:
            with compile_only(arch) as compiled:
                run_configuration(config)
            kernels += len(compiled)
        except KernelCompileError as error:
            failures.append(f"FAIL {name} [{config.name}] {error}")
    report = "\n".join([*failures, f"{name}: {len(configs)} configurations, {kernels} kernels compiled, "
                                    f"{len(failures)} failures, {time.perf_counter() - start:.0f} s"])
    return failures, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="*", default=["80", "90"],
                        help="targets to compile every configuration for: NVIDIA compute capabilities "
                             f"(80, sm_90) or AMD architectures ({', '.join(AMD_WAVEFRONTS)})")
    parser.add_argument("--quick-arch", nargs="*", default=[],
                        help="targets to compile the short list for (every path, all options)")
    parser.add_argument("--only", default="", help="only the configurations whose name contains this text")
    parser.add_argument("--jobs", type=int, default=1, help="targets compiled in parallel, one process each")
    args = parser.parse_args(argv)
    if launch.INTERPRETED:
        parser.error("the kernels were loaded by Triton's interpreter: run with TRITON_INTERPRET unset")
    targets = []
    for option, archs, quick in (("--arch", args.arch, False), ("--quick-arch", args.quick_arch, True)):
        try:
            targets += [(gpu_target(arch), quick) for arch in archs]
        except ValueError as error:
            parser.error(f"{option}: {error}")
    print(f"Triton {triton.__version__}, torch {torch.__version__}: compiling " + "; ".join(
        f"{sum(args.only in c.name for c in configurations(quick))} configurations for {target_name(target)}"
        for target, quick in targets), flush=True)
    archs, quicks = [target_name(target) for target, _ in targets], [quick for _, quick in targets]
    onlys = [args.only] * len(targets)
    if args.jobs > 1:
        # spawn, not fork: each worker starts with its own Triton state and driver.
        pool = ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(check_arch, archs, onlys, quicks)
    else:
        pool, results = contextlib.nullcontext(), map(check_arch, archs, onlys, quicks)
    failures = []
    with pool:
        for arch_failures, report in results:
            failures += arch_failures
            print(report, flush=True)
    print("FAILED" if failures else "all kernels compiled", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
