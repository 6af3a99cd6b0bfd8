"""What the Triton compiler makes of moeut's expert kernels for Hopper (sm_90), on a machine without a GPU.

Each σ-MoE FFN pass at the 244M shapes goes through moeut's own wrapper (`grouped_mm_triton`,
`weight_grad_segments_triton`), so the kernel variants and constexpr flags are the ones a training
step launches. Instead of launching, each tile config the autotuner would try is compiled for sm_90,
and the table says, per pass and config:
- whether the dot became Hopper's warp-group MMA (wgmma) or fell back to mma.sync;
- how many asynchronous copies feed it (cp.async), and how many TMA copies;
- the shared memory it takes;
- each shared operand's swizzle width and whether it is stored transposed.

A kernel change can be checked for Hopper code generation here before it costs device time. RESULTS.md
L.3 used it: the up projection and the down projection's input gradient both get wgmma and a 5-stage
cp.async pipeline, but the latter's weight tile is stored transposed with a 64-byte swizzle.

    python benchmarks/compile_sm90.py [--passes "up fwd,down dx"] [--first-config] [--glue] [--ir-dir DIR] [--json F]

`--glue` also compiles the LayerNorm and router-statistics kernels (no dots: whether they
compile for sm_90 at the 244M shapes, and their shared memory).

The local Triton may differ from the device's (3.9 here, 3.6 on the H200). Read the IR as indicative,
and nothing here is a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

HOPPER_SMEM = 232448  # bytes of shared memory a block may opt into on the H100 / H200


def _fake_hopper_driver():
    """Triton's CUDA driver answering as an sm_90 device with no GPU present (compiling only)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class CompileOnlyHopper(CudaDriver):
        def __init__(self):  # (CudaDriver's own loads the CUDA runtime)
            pass

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    return CompileOnlyHopper()


def ir_features(ttgir: str) -> dict:
    """The facts the table prints, read from a kernel's TritonGPU IR."""
    shared = re.findall(r"nvmma_shared<\{swizzlingByteWidth = (\d+), transposed = (\w+)", ttgir)
    return dict(
        wgmma="ttng.warp_group_dot " in ttgir,
        mma_sync="versionMajor = 2" in ttgir,
        async_copies=ttgir.count("ttg.async_copy_global_to_local"),
        tma_copies=ttgir.count("async_tma_copy_global_to_local"),
        shared_layouts=[f"{width}B{' T' if t == 'true' else ''}" for width, t in shared],
    )


class _CompileInsteadOfLaunch:
    """Stands in for an autotuned kernel: `kernel[grid](*args, **flags)` compiles it for sm_90 with each
    config the autotuner would try (after its pruning) and records one row per config."""

    def __init__(self, tuner, pass_name: str, rows: list, first_config: bool, ir_dir: Path = None):
        self.tuner, self.pass_name, self.rows, self.first_config, self.ir_dir = (
            tuner,
            pass_name,
            rows,
            first_config,
            ir_dir,
        )

    def __getitem__(self, grid):
        def launch(*args, **flags):
            configs = self.tuner.configs
            prune = getattr(self.tuner, "early_config_prune", None)
            if prune is not None:
                configs = prune(configs, dict(zip(self.tuner.arg_names, args)), **flags)
            for config in configs[:1] if self.first_config else configs:
                compiled = self.tuner.fn.warmup(*args, grid=grid, **flags, **config.all_kwargs())
                ttgir = compiled.asm["ttgir"]
                self.rows.append(
                    dict(
                        pass_=self.pass_name,
                        config=_short(config),
                        shared_bytes=compiled.metadata.shared,
                        **ir_features(ttgir),
                    )
                )
                if self.ir_dir is not None:
                    stem = re.sub(r"\W+", "_", f"{self.pass_name} {_short(config)}").strip("_")
                    (self.ir_dir / f"{stem}.ttgir").write_text(ttgir)
                    (self.ir_dir / f"{stem}.ptx").write_text(compiled.asm["ptx"])

        return launch


def _short(config) -> str:
    tiles = ",".join(f"{k}{v}" for k, v in config.kwargs.items())
    return f"{tiles} w{config.num_warps} s{config.num_stages}"


PASSES = ("up fwd", "down fwd", "down dx", "up dx", "up dW", "down dW")


def ffn_passes(D: int = 1024, E: int = 387, K: int = 16, S: int = 128, T: int = 16384):
    """{pass name: a call of moeut's wrapper that launches it}, the σ-MoE FFN at the given shapes (244M)."""
    from moeut.kernels import expert_mm as tem, weight_grad as twg

    bf16 = dict(dtype=torch.bfloat16)
    N = T * K
    x, gy = torch.empty(T, D, **bf16), torch.empty(T, D, **bf16)
    h, gh = torch.empty(N, S, **bf16), torch.empty(N, S, **bf16)
    w1, w2 = torch.empty(E, D, S, **bf16), torch.empty(E, S, D, **bf16)
    offsets, rows, slot = torch.zeros(E + 1, dtype=torch.long), torch.zeros(N, dtype=torch.long), torch.arange(N)
    gate = torch.empty(N)
    passes = {
        "up fwd": lambda: tem.grouped_mm_triton(x, w1, offsets, rows, relu=True),
        "down fwd": lambda: tem.grouped_mm_triton(h, w2, offsets, None, gate, slot, scale_at_dst=True),
        "down dx": lambda: tem.grouped_mm_triton(gy, w2.transpose(1, 2), offsets, rows),
        "up dx": lambda: tem.grouped_mm_triton(gh, w1.transpose(1, 2), offsets, None, None, slot),
        "up dW": lambda: twg.weight_grad_segments_triton(
            [(x, gh, offsets, rows, None, None, None)] * 3, torch.float32, accumulate_into=torch.empty(E, D, S)
        ),
        "down dW": lambda: twg.weight_grad_segments_triton(
            [(h, gy, offsets, None, rows, gate, slot)] * 3, torch.float32, accumulate_into=torch.empty(E, S, D)
        ),
    }
    assert tuple(passes) == PASSES
    return passes


def compile_passes(names=None, first_config: bool = False, ir_dir: Path = None) -> list:
    """One row per (pass, config): `ir_features` of its sm_90 compile, plus its shared memory in bytes."""
    from triton.runtime import driver
    from moeut.kernels import expert_mm as tem, weight_grad as twg

    saved = dict(
        mm=tem._expert_mm_kernel,
        wgrad=twg._weight_grad_kernel,
        smem=tem._smem_limit,
        driver=getattr(driver, "_active", None),
    )  # (`reset_active` raises on a machine without a GPU)
    driver.set_active(_fake_hopper_driver())
    rows = []
    try:
        tem._smem_limit = lambda: int(0.9 * HOPPER_SMEM)  # what `_prune_mm_configs` asks the device
        for name, run in ffn_passes().items():
            if names is not None and name not in names:
                continue
            tem._expert_mm_kernel = _CompileInsteadOfLaunch(saved["mm"], name, rows, first_config, ir_dir)
            twg._weight_grad_kernel = _CompileInsteadOfLaunch(saved["wgrad"], name, rows, first_config, ir_dir)
            run()
    finally:
        tem._expert_mm_kernel, twg._weight_grad_kernel, tem._smem_limit = saved["mm"], saved["wgrad"], saved["smem"]
        driver._active = saved["driver"]
    return rows


class _CompileJit:
    """Stands in for a plain (not autotuned) kernel: `kernel[grid](*args, **flags)` compiles it for sm_90
    and records one row."""

    def __init__(self, fn, name: str, rows: list):
        self.fn, self.name, self.rows = fn, name, rows

    def __getitem__(self, grid):
        def launch(*args, **flags):
            compiled = self.fn.warmup(*args, grid=grid, **flags)
            self.rows.append(
                dict(
                    pass_=self.name,
                    config=f"w{flags.get('num_warps', 4)}",
                    shared_bytes=compiled.metadata.shared,
                    **ir_features(compiled.asm["ttgir"]),
                )
            )

        return launch


def glue_launches(D: int = 1024, E: int = 387, K: int = 16, T: int = 16384):
    """{module: (kernel names, a call of moeut's wrapper that launches them)} for the kernels besides
    the expert GEMMs that a 244M training step runs."""
    from moeut.kernels import entropy as triton_entropy, norm as triton_norm

    x, w = torch.empty(T, D), torch.empty(D)
    mean, rstd, gy = torch.empty(T), torch.empty(T), torch.empty(T, D, dtype=torch.bfloat16)
    expert = torch.zeros(T, K, dtype=torch.long)
    logits = torch.empty(T // 1024, 1024, E + 5, dtype=torch.bfloat16)  # the FFN's padded selector product
    gate, grad_sum = torch.empty(T, K, dtype=torch.bfloat16), torch.empty(T // 1024, E)
    return {
        triton_norm: (
            ("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_layer_norm_sum_partials_kernel"),
            lambda: (
                triton_norm.layer_norm_fwd(x, w, w, 1e-5, torch.bfloat16),
                triton_norm.layer_norm_bwd(gy, x, w, mean, rstd, grad_add=x),
            ),
        ),
        triton_entropy: (
            ("_prob_sum_kernel", "_router_backward_kernel"),
            lambda: (
                triton_entropy.prob_sum_triton(logits[..., :E]),
                triton_entropy.router_backward_triton(logits, E, grad_sum, gate, expert, gate),
            ),
        ),
    }


def compile_glue() -> list:
    """One row per glue kernel of `glue_launches`: `ir_features` of its sm_90 compile and its shared memory."""
    from triton.runtime import driver

    saved_driver = getattr(driver, "_active", None)
    driver.set_active(_fake_hopper_driver())
    rows = []
    try:
        for module, (names, run) in glue_launches().items():
            saved = {n: getattr(module, n) for n in names}
            try:
                for n in names:
                    setattr(module, n, _CompileJit(saved[n], n, rows))
                run()
            finally:
                for n in names:
                    setattr(module, n, saved[n])
    finally:
        driver._active = saved_driver
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", help="comma-separated pass names (default: all): " + ", ".join(PASSES))
    ap.add_argument("--first-config", action="store_true", help="only the first config that fits (quick)")
    ap.add_argument("--ir-dir", type=Path, help="also write each compile's TTGIR and PTX there")
    ap.add_argument("--json", type=Path, help="also write the rows")
    ap.add_argument("--glue", action="store_true", help="also the LayerNorm and router-statistics kernels")
    args = ap.parse_args(argv)
    if os.environ.pop("TRITON_INTERPRET", "0") == "1" and "moeut.kernels.expert_mm" in sys.modules:
        raise SystemExit("compile_sm90: moeut's kernels were imported for the interpreter; run this in a fresh process")
    if args.ir_dir:
        args.ir_dir.mkdir(parents=True, exist_ok=True)
    rows = compile_passes(args.passes.split(",") if args.passes else None, args.first_config, args.ir_dir)
    print(f"{'pass':9s} {'config':28s} {'MMA':6s} {'cp.async':>8s} {'TMA':>4s} {'shared KB':>9s}  shared operands")
    for r in rows:
        mma = "wgmma" if r["wgmma"] else "mma.sync" if r["mma_sync"] else "none"
        print(
            f"{r['pass_']:9s} {r['config']:28s} {mma:6s} {r['async_copies']:8d} {r['tma_copies']:4d} "
            f"{r['shared_bytes'] / 1024:9.1f}  {' '.join(r['shared_layouts'])}"
        )
    glue = compile_glue() if args.glue else []
    if glue:
        print(f"\n{'glue kernel':32s} {'warps':5s} {'shared KB':>9s}")
        for r in glue:
            print(f"{r['pass_']:32s} {r['config']:5s} {r['shared_bytes'] / 1024:9.1f}")
    if args.json:
        args.json.write_text(json.dumps(dict(shared_limit=HOPPER_SMEM, rows=rows, glue=glue), indent=1))
    return rows


if __name__ == "__main__":
    main()
