"""Triton kernel for the weight gradient of `moeut::expert_mm`, and the sum of its row ranges.

Same contract as the plain-PyTorch `grouped_mm.weight_grad_reference` (the reference every test compares
with): routed rows are sorted by expert, expert e owns rows offsets[e]:offsets[e+1], and the gradient of
expert e's weight is the sum over those rows of x_row^T g_row (either operand gathered, optionally
gated).

* One program per (expert, output tile) loops over that expert's rows and writes its tile once: no
  atomics, so the result is bit-reproducible (the official kernel accumulated with atomic adds). One
  expert's tiles are adjacent programs, so they share that expert's rows in L2.
* A gate may scale one operand inside the K loop (GSCALE: the input rows, the MMA's left operand, which
  Hopper reads from registers). The training path avoids it: the backward writes a gated copy of one
  operand beforehand, and the kernel runs ungated, its operands straight from shared memory.
* One launch can sum the gradients of up to nine applications of a shared weight
  (`weight_grad_segments_triton`; each kernel argument a tuple with one entry per application): each
  tile reads and writes the fp32 sum once for all of them.
* Where the experts are too few to fill the GPU (SwitchHead at 244M: 4 heads x 10 experts, 320 output
  tiles for 132 SMs), each expert's rows are split into ranges, one program each, whose fp32 partials
  `_sum_splits_kernel` adds in a fixed order (`wgrad_splits`): still no atomics.

Runs under `TRITON_INTERPRET=1` on CPU tensors, which is how CI checks its logic.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moeut.settings import settings
from moeut.kernels.expert_mm import INTERPRET, aligned, or_default, triton

WGRAD_MAX_SPLITS = 8


def wgrad_splits(E: int, I: int, O: int, rows: int, device: torch.device) -> int:
    """How many row ranges each expert's weight gradient is split into, each summed by its own program
    into an fp32 partial that `_sum_splits_kernel` adds up in a fixed order (deterministic, no atomics).

    One program per (expert, 128 x 128 output tile) leaves SMs idle when experts are few: SwitchHead's
    value and output projections at 244M (routed over 4 heads x 10 experts of 1024 x 128) launch 320
    programs on the H200's 132 SMs, each walking ~3.3k rows per application; they get 2 ranges. The
    rule aims at about four programs per SM, never below 1024 rows per range, so the FFN (387 experts:
    3096 tiles) and 1B's SwitchHead (72 experts, 864 tiles) are not split."""
    if device.type != "cuda":
        return 1
    tiles = E * triton.cdiv(I, 128) * triton.cdiv(O, 128)
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    if tiles >= target:
        return 1
    return max(1, min(WGRAD_MAX_SPLITS, triton.cdiv(target, tiles), rows // (E * 1024)))


if triton is not None:
    import triton.language as tl

    from moeut.kernels.expert_mm import dot_acc

    def _wgrad_configs():
        if INTERPRET:
            return [triton.Config({"BI": 16, "BO": 16, "BK": 16}, num_warps=4)]
        # benchmarks/kernel_sweep.py picks them: the first for the down projection's weight gradient,
        # the second for the up projection's; SwitchHead's shapes share them.
        return [
            triton.Config({"BI": 128, "BO": 128, "BK": 32}, num_warps=8, num_stages=5),
            triton.Config({"BI": 64, "BO": 128, "BK": 64}, num_warps=4, num_stages=4),
            triton.Config({"BI": 128, "BO": 128, "BK": 64}, num_warps=4, num_stages=4),
        ][: None if settings.autotune else 1]

    def _prune_wgrad_configs(configs, named_args, **kwargs):
        """Every config, or the first with `settings.autotune` off (the list then holds only that one, so
        Triton skips tuning altogether)."""
        return configs if settings.autotune else configs[:1]

    @triton.jit
    def _wgrad_segment(
        acc,
        x_ptr,
        g_ptr,
        offsets_ptr,
        rows_ptr,
        grows_ptr,
        gscale_ptr,
        sdst_ptr,
        sxr,
        sxi,
        sgr,
        sgo,
        e,
        ii,
        oo,
        i_ok,
        o_ok,
        GATHER: tl.constexpr,
        GGATHER: tl.constexpr,
        GSCALE: tl.constexpr,
        FP32: tl.constexpr,
        SCALE_AT_DST: tl.constexpr,
        BK: tl.constexpr,
        split,
        n_split,
    ):
        # acc += (one application's) sum over row range `split` of n_split of expert e's routed rows of
        # x_row^T g_row for this tile (ranges of whole BK blocks; the last ones may be empty)
        lo = tl.load(offsets_ptr + e)
        hi = tl.load(offsets_ptr + e + 1)
        per_split = tl.cdiv(tl.cdiv(hi - lo, BK), n_split) * BK
        lo = lo + split * per_split
        hi = tl.minimum(hi, lo + per_split)
        ks = tl.arange(0, BK)
        for r0 in range(lo, hi, BK):
            rows = r0 + ks
            r_ok = rows < hi
            if GATHER:
                src = tl.load(rows_ptr + rows, mask=r_ok, other=0)
            else:
                src = rows
            if GGATHER:
                gsrc = tl.load(grows_ptr + rows, mask=r_ok, other=0)
            else:
                gsrc = rows
            a = tl.load(
                x_ptr + src[None, :].to(tl.int64) * sxr + ii[:, None] * sxi,
                mask=i_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
            b = tl.load(
                g_ptr + gsrc[:, None].to(tl.int64) * sgr + oo[None, :] * sgo,
                mask=r_ok[:, None] & o_ok[None, :],
                other=0.0,
            )
            if GSCALE:  # x's rows scaled in fp32 and rounded: as scaling them before the product
                if SCALE_AT_DST:  # gates in (row, choice) order: routed row n's is at sdst[n]
                    sat = tl.load(sdst_ptr + rows, mask=r_ok, other=0)
                else:
                    sat = rows
                s = tl.load(gscale_ptr + sat, mask=r_ok, other=0.0).to(tl.float32)
                a = (a.to(tl.float32) * s[None, :]).to(x_ptr.dtype.element_ty)
            acc = dot_acc(a, b, acc, FP32)
        return acc

    @triton.autotune(
        configs=_wgrad_configs(),
        key=["I", "O", "N_SEG", "GATHER", "GGATHER", "GSCALE", "FP32", "ACCUMULATE", "SCALE_AT_DST", "n_split"],
        prune_configs_by={"early_config_prune": _prune_wgrad_configs},
        restore_value=["out_ptr"],
    )  # benchmark runs must not add into an accumulator twice
    @triton.jit
    def _weight_grad_kernel(
        out_ptr,
        I,
        O,
        soe,
        soi,
        soo,
        E,
        n_split,
        xs,
        gs,
        offsets,
        rows,
        grows,
        gscales,
        sdsts,
        sxr,
        sxi,
        sgr,
        sgo,
        N_SEG: tl.constexpr,
        GATHER: tl.constexpr,
        GGATHER: tl.constexpr,
        GSCALE: tl.constexpr,
        FP32: tl.constexpr,
        ACCUMULATE: tl.constexpr,
        SCALE_AT_DST: tl.constexpr,
        BI: tl.constexpr,
        BO: tl.constexpr,
        BK: tl.constexpr,
    ):
        # N_SEG segments (applications of one shared weight, each with its own rows and routing: entry s
        # of each tuple argument) summed in one accumulator: the output tile is read and written once for
        # all of them. With n_split > 1 program (split, e, tile) sums row range `split` of every segment
        # into out[split * E + e].
        n_o = tl.cdiv(O, BO)
        n_tiles = tl.cdiv(I, BI) * n_o
        split = tl.program_id(0) // (E * n_tiles)
        e = (tl.program_id(0) // n_tiles) % E
        pid = tl.program_id(0) % n_tiles
        ii = (pid // n_o) * BI + tl.arange(0, BI)
        oo = (pid % n_o) * BO + tl.arange(0, BO)
        i_ok = ii < I
        o_ok = oo < O
        acc = tl.zeros((BI, BO), dtype=tl.float32)
        for s in range(N_SEG):  # one loop body for any count: segment s's arguments picked by selects
            x_ptr, g_ptr, off_ptr, rows_ptr = xs[0], gs[0], offsets[0], rows[0]
            grows_ptr, gs_ptr, sdst_ptr = grows[0], gscales[0], sdsts[0]
            sxr_s, sxi_s, sgr_s, sgo_s = sxr[0], sxi[0], sgr[0], sgo[0]
            for j in tl.static_range(1, N_SEG):
                here = s == j
                x_ptr, g_ptr = tl.where(here, xs[j], x_ptr), tl.where(here, gs[j], g_ptr)
                off_ptr, rows_ptr = tl.where(here, offsets[j], off_ptr), tl.where(here, rows[j], rows_ptr)
                grows_ptr, gs_ptr = tl.where(here, grows[j], grows_ptr), tl.where(here, gscales[j], gs_ptr)
                sdst_ptr = tl.where(here, sdsts[j], sdst_ptr)
                sxr_s, sxi_s = tl.where(here, sxr[j], sxr_s), tl.where(here, sxi[j], sxi_s)
                sgr_s, sgo_s = tl.where(here, sgr[j], sgr_s), tl.where(here, sgo[j], sgo_s)
            acc = _wgrad_segment(
                acc,
                x_ptr,
                g_ptr,
                off_ptr,
                rows_ptr,
                grows_ptr,
                gs_ptr,
                sdst_ptr,
                sxr_s,
                sxi_s,
                sgr_s,
                sgo_s,
                e,
                ii,
                oo,
                i_ok,
                o_ok,
                GATHER,
                GGATHER,
                GSCALE,
                FP32,
                SCALE_AT_DST,
                BK,
                split,
                n_split,
            )
        o_ptrs = out_ptr + (split * E + e).to(tl.int64) * soe + ii[:, None] * soi + oo[None, :] * soo
        if ACCUMULATE:  # out += this tile: one rounding, as a separate add would do
            acc += tl.load(o_ptrs, mask=i_ok[:, None] & o_ok[None, :], other=0.0).to(tl.float32)
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & o_ok[None, :])

    @triton.jit
    def _sum_splits_kernel(parts_ptr, out_ptr, numel, n_split, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
        # out (+)= the n_split fp32 partial weight gradients, added in split order: one rounding
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        if ACCUMULATE:
            acc += tl.load(out_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        for split in range(0, n_split):
            acc += tl.load(parts_ptr + split * numel + offs, mask=ok, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# The most applications one weight-gradient launch sums: every application of a weight in the paper's
# models (n_layers / group_size is 8 or 9). Each is one iteration of the kernel's runtime loop; the cap
# bounds its arguments (11 per application) and the operands a sink holds until the launch.
MAX_SEGMENTS = 9


def grouped_mm_weight_grad_triton(
    x_RI: Tensor,
    grad_MO: Tensor,
    offsets_E1: Tensor,
    rows_N: Optional[Tensor],
    grad_rows_N: Optional[Tensor] = None,
    grad_scale_N: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    accumulate_into: Optional[Tensor] = None,
    scale_dst_N: Optional[Tensor] = None,
) -> Tensor:
    """The weight gradient [E, I, O], or (accumulate_into) that tensor with the gradient added to it.
    scale_dst_N: routed row n's scale is grad_scale[scale_dst_N[n]]."""
    return weight_grad_segments_triton(
        [(x_RI, grad_MO, offsets_E1, rows_N, grad_rows_N, grad_scale_N, scale_dst_N)], out_dtype, accumulate_into
    )


def weight_grad_segments_triton(
    segments, out_dtype: Optional[torch.dtype] = None, accumulate_into: Optional[Tensor] = None
) -> Tensor:
    """The sum of several weight gradients of one weight in one launch (at most MAX_SEGMENTS): each
    segment is (x, grad, offsets, rows, grad_rows, grad_scale, scale_dst) as in
    `grouped_mm_weight_grad_triton`, with the same layout flags (which operands are gathered or scaled).
    Summed in segment order in one fp32 accumulator per tile, then (accumulate_into) added to it."""
    if not 1 <= len(segments) <= MAX_SEGMENTS:
        raise ValueError(f"weight_grad_segments_triton: {len(segments)} segments (1 to {MAX_SEGMENTS})")
    x0, g0, off0 = segments[0][:3]
    E = off0.numel() - 1
    I, O = x0.shape[1], g0.shape[1]
    flags = _segment_flags(segments[0])
    columns = []  # one tuple per kernel argument, entry s for segment s
    for seg in segments:
        x_RI, grad_MO, offsets_E1, rows_N, grad_rows_N, grad_scale_N, scale_dst_N = seg
        if (x_RI.shape[1], grad_MO.shape[1], offsets_E1.numel() - 1, x_RI.dtype, grad_MO.dtype) != (
            I,
            O,
            E,
            x0.dtype,
            g0.dtype,
        ) or _segment_flags(seg) != flags:
            raise ValueError(
                "weight_grad_segments_triton: segments of one launch must share shapes, dtypes and "
                "which operands are gathered or scaled"
            )
        x_RI, grad_MO = aligned(x_RI), aligned(grad_MO)
        unused = offsets_E1
        scale = grad_scale_N.contiguous() if grad_scale_N is not None else None  # any float dtype: read as fp32
        columns.append(
            (
                x_RI,
                grad_MO,
                offsets_E1,
                or_default(rows_N, unused),
                or_default(grad_rows_N, unused),
                or_default(scale, unused),
                or_default(scale_dst_N, unused),
                x_RI.stride(0),
                x_RI.stride(1),
                grad_MO.stride(0),
                grad_MO.stride(1),
            )
        )
    args = [tuple(column) for column in zip(*columns)]
    out_EIO = accumulate_into
    if out_EIO is None:
        out_EIO = torch.empty(E, I, O, device=x0.device, dtype=out_dtype or x0.dtype)
    rows = segments[0][3].numel() if segments[0][3] is not None else x0.shape[0]
    n_split = wgrad_splits(E, I, O, rows, x0.device) if out_EIO.is_contiguous() else 1
    # n_split > 1: the programs write fp32 partials [n_split * E, I, O], summed into out_EIO below
    dest = out_EIO if n_split == 1 else torch.empty(n_split * E, I, O, device=x0.device, dtype=torch.float32)

    def grid(meta):
        return (n_split * E * triton.cdiv(I, meta["BI"]) * triton.cdiv(O, meta["BO"]),)

    gather, ggather, gscale, scale_at_dst = flags
    _weight_grad_kernel[grid](
        dest,
        I,
        O,
        dest.stride(0),
        dest.stride(1),
        dest.stride(2),
        E,
        n_split,
        *args,
        N_SEG=len(segments),
        GATHER=gather,
        GGATHER=ggather,
        GSCALE=gscale,
        FP32=x0.dtype == torch.float32,
        ACCUMULATE=accumulate_into is not None and n_split == 1,
        SCALE_AT_DST=scale_at_dst,
    )
    if n_split > 1:
        BLOCK = 1024
        _sum_splits_kernel[(triton.cdiv(out_EIO.numel(), BLOCK),)](
            dest, out_EIO, out_EIO.numel(), n_split, ACCUMULATE=accumulate_into is not None, BLOCK=BLOCK, num_warps=4
        )
    return out_EIO


def _segment_flags(segment):
    _, _, _, rows_N, grad_rows_N, grad_scale_N, scale_dst_N = segment
    return rows_N is not None, grad_rows_N is not None, grad_scale_N is not None, scale_dst_N is not None


def autotune_choices(kernels=None) -> list:
    """[(kernel, {key argument: value}, config)]: the config each autotuning key of the expert GEMM and
    weight-gradient kernels settled on in this process (a kernel with a single config: that config,
    key None). Benchmarks print it beside their timings: the choice varies between processes and a
    poor one costs a pass a third of its time. Empty without Triton."""
    if triton is None:
        return []
    rows = []
    if kernels is None:
        from moeut.kernels.expert_mm import AUTOTUNED_MM_KERNEL

        kernels = (AUTOTUNED_MM_KERNEL, _weight_grad_kernel)
    for tuner in kernels:
        name = getattr(tuner.fn, "__name__", str(tuner.fn))
        if len(tuner.configs) == 1:
            rows.append((name, None, str(tuner.configs[0])))
            continue
        names = list(tuner.keys)
        for key, config in tuner.cache.items():  # key: the key arguments' values, then tensor dtypes
            rows.append((name, dict(zip(names, key)), str(config)))
    return rows
