"""The GPU benchmark `benchmarks/kernel_bench.py` can only run on a GPU; what it computes from its rows can be
checked here: every pass its whole-FFN roofline sums is a row the script produces, and the sum is right.
Also the other benchmark scripts' CPU-side logic (profile_step.py's tables, plot_throughput.py's lines)."""

import json
import re
import sys

import pytest
import torch
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import kernel_bench as kernels  # noqa: E402


def test_roofline_passes_are_rows_of_time_shape():
    source = (BENCHMARKS / "kernel_bench.py").read_text()
    labels = set(re.findall(r'add\(\s*f?"([^"]+)"', source)) | set(re.findall(r'\(\s*"(top-k sum, [^"]+)"', source))
    missing = [p for p in kernels.FFN_FWD_PASSES + kernels.FFN_BWD_PASSES if p not in labels]
    assert not missing, missing


def test_ffn_roofline_sums_its_passes_of_one_shape():
    passes = kernels.FFN_FWD_PASSES + kernels.FFN_BWD_PASSES
    rows = [dict(shape="244M", pass_=p, roofline_ms=float(i + 1)) for i, p in enumerate(passes)]
    rows += [dict(shape="1B", pass_=p, roofline_ms=100.0) for p in passes]
    rows += [dict(shape="244M", pass_="down fwd [column blocks]", roofline_ms=1000.0)]  # not summed
    fwd, fwd_bwd = kernels.ffn_roofline_ms(rows, "244M")
    n = len(kernels.FFN_FWD_PASSES)
    assert fwd == sum(range(1, n + 1))
    assert fwd_bwd == sum(range(1, len(passes) + 1))


def test_profile_categories_cover_a_real_step_and_keep_its_total():
    """Kernel names as a 244M step's profile printed them (RESULTS I): each lands in the category
    the journal reasons with, and the categories' times add up to the kernels'."""
    import profile_step

    names = {
        "_expert_mm_kernel": "expert GEMMs",
        "_weight_grad_kernel": "expert weight gradients",
        "_sum_choices_kernel": "top-k sums",
        "_row_dot_kernel": "row dots",
        "_sigmoid_topk_kernel": "router and regulariser",
        "_router_backward_kernel": "router and regulariser",
        "_prob_sum_kernel": "router and regulariser",
        "_rope_kernel": "RoPE",
        "void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda(at": "bf16 casts",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::Tenso": "other copies",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, std:": "fp32 adds",
        "void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernelTemplate<float, float, ": "LayerNorm",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float, false>(": "LayerNorm",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_1x4x1_cga1x1": "attention core",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous n": "AdamW",
        "void at_cuda_detail::cub::detail::radix_sort::DeviceRadixSortOnesweepKernel<at_cuda_detail": "sort and index glue",
        "void at::native::_scatter_gather_elementwise_kernel<128, 8, at::native::_cuda_scatter_gath": "sort and index glue",
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "dense GEMMs (cuBLAS)",
        "_layer_norm_bwd_kernel": "LayerNorm",
        "_layer_norm_sum_partials_kernel": "LayerNorm",
        "some_kernel_nobody_named": "other",
    }
    for name, want in names.items():
        assert profile_step.category(name) == want, name
    per_kernel = {name: [float(i + 1), 2 * i + 1] for i, name in enumerate(names)}
    cats = profile_step.by_category(per_kernel)
    assert sum(v[0] for v in cats.values()) == sum(v[0] for v in per_kernel.values())
    assert sum(v[1] for v in cats.values()) == sum(v[1] for v in per_kernel.values())
    layer_norm = [per_kernel[n] for n, want in names.items() if want == "LayerNorm"]
    assert len(layer_norm) == 4 and cats["LayerNorm"] == [sum(t for t, _ in layer_norm), sum(c for _, c in layer_norm)]


def test_profile_launches_split_the_expert_kernels_by_launch_shape(capsys):
    """--launches: the expert kernels' events of a Chrome trace (as torch's profiler writes them on
    the GPU) grouped by (name, grid, block), so the FFN's passes and SwitchHead's are separate rows;
    other kernels and CPU events are left out, and every kept launch is counted once."""
    import profile_step

    kernel = lambda name, grid, dur, block=(256, 1, 1): dict(
        cat="kernel", name=name, dur=dur, args=dict(grid=list(grid), block=list(block))
    )
    events = [
        kernel("_expert_mm_kernel", (24768, 1, 1), 180.0),
        kernel("_expert_mm_kernel", (24768, 1, 1), 184.0),
        kernel("_expert_mm_kernel", (1060, 1, 1), 70.0),
        kernel("_expert_mm_kernel", (1060, 1, 1), 72.0, (128, 1, 1)),
        kernel("_weight_grad_kernel", (3096, 1, 1), 1500.0),
        kernel("nvjet_sm90_tst_256x128", (132, 1, 1), 90.0),
        dict(cat="cpu_op", name="_expert_mm_kernel", dur=5.0),
    ]
    per_launch = profile_step.launch_times(events)
    assert per_launch == {
        ("_expert_mm_kernel", (24768, 1, 1), (256, 1, 1)): [364.0, 2],
        ("_expert_mm_kernel", (1060, 1, 1), (256, 1, 1)): [70.0, 1],
        ("_expert_mm_kernel", (1060, 1, 1), (128, 1, 1)): [72.0, 1],
        ("_weight_grad_kernel", (3096, 1, 1), (256, 1, 1)): [1500.0, 1],
    }
    profile_step.print_launches(per_launch, iters=1, top=2)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "_weight_grad_kernel" in lines[1] and "182.0" in lines[2]  # costliest first


def test_profile_sites_name_the_moeut_function_and_the_backward_node():
    """--sites on a CPU profile of MoEUT_tiny (leaf CPU ops standing in for kernels): the forward's
    glue is attributed to moeut functions, the backward's to the autograd node it ran in, and every
    op's time is counted once."""
    import profile_step
    import moeut
    from moeut import profiles

    torch.manual_seed(0)
    model = moeut.MoEUTLM(64, **profiles.MOEUT_PROFILES["tiny"])
    tokens = torch.randint(0, 64, (2, 16))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as prof:
        out = model(tokens)
        (out.outputs.float().sum() + out.reg_loss.sum()).backward()
    per_site = profile_step.site_times(prof.events(), use_kernels=False)
    sites = {site for (_, site, _, _) in per_site}
    assert any(s.startswith("ops/router.py(") for s in sites), sites
    assert any("ops/expert_mm.py(" in s and "[" not in s for s in sites), sites
    assert any(s.endswith("Backward]") for s in sites), sites
    leaves = [e for e in prof.events() if not e.cpu_children and e.name.startswith("aten::")]
    assert sum(v[1] for v in per_site.values()) == len(leaves)


def test_throughput_series_by_size_and_by_batch(tmp_path):
    """plot_throughput.py: one line per family and mode against parameters; with by_batch, one line per
    model size against the batch (a 244M and a 1B run of one family are not joined)."""
    import plot_throughput

    rows = [
        dict(model="moeut-244M", batch=16, tokens_per_s=180e3, params_m=243.3, cuda_graph=True),
        dict(model="moeut-244M", batch=64, tokens_per_s=200e3, params_m=243.3, cuda_graph=True),
        dict(model="moeut-1B", batch=8, tokens_per_s=44e3, params_m=1040.3, cuda_graph=True),
        dict(model="dense-1B", batch=8, tokens_per_s=60e3, params_m=1044.3, cuda_graph=True),
        dict(model="dense-1B", batch=16, error="OutOfMemoryError"),
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(dict(results=rows)))
    by_batch = plot_throughput.series([path], by_batch=True)
    assert by_batch == {
        ("moeut", "CUDA graph", "244M"): [(16, 180.0), (64, 200.0)],
        ("moeut", "CUDA graph", "1B"): [(8, 44.0)],
        ("dense", "CUDA graph", "1B"): [(8, 60.0)],
    }
    by_size = plot_throughput.series([path])
    assert by_size[("moeut", "CUDA graph")] == [(243.3, 180.0), (243.3, 200.0), (1040.3, 44.0)]


def test_profile_diff_names_the_kernels_a_change_moved(tmp_path, capsys):
    """profile_diff.py on a real 244M step profile (J.4) and a copy where a change folded the FFN's row
    dots (18 calls) into the expert GEMMs and made them slower by more than it saved: the busy time,
    the categories and the kernels that moved, largest change first, with the calls that moved."""
    import profile_diff

    a = json.loads((BENCHMARKS / "results" / "profile_244m.json").read_text())
    b = json.loads(json.dumps(a))
    row_dot, gemm = b["kernels"]["_row_dot_kernel"], b["kernels"]["_expert_mm_kernel"]
    row_dot["ms"], row_dot["calls"] = row_dot["ms"] / 2, row_dot["calls"] - 18
    gemm["ms"] += 1.5
    for cat, delta in (("row dots", -a["kernels"]["_row_dot_kernel"]["ms"] / 2), ("expert GEMMs", 1.5)):
        b["categories"][cat]["ms"] += delta
    b["categories"]["row dots"]["calls"] -= 18
    b["busy_ms"] += 1.5 - a["kernels"]["_row_dot_kernel"]["ms"] / 2
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    profile_diff.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--top", "3"])
    out = capsys.readouterr().out
    assert f"B - A {1.5 - a['kernels']['_row_dot_kernel']['ms'] / 2:+.2f}" in out
    kernel_rows = out.split("  kernel\n")[1].strip().splitlines()
    assert len(kernel_rows) == 3
    assert kernel_rows[0].endswith("_expert_mm_kernel") and "+1.500" in kernel_rows[0]
    assert kernel_rows[1].endswith("_row_dot_kernel") and kernel_rows[1].split()[3] == "-18"
    category_rows = out.split("  category\n")[1].split("\n\n")[0].splitlines()
    assert category_rows[0].endswith("expert GEMMs") and category_rows[1].endswith("row dots")
    # the autotuning choices: a key only in B (a new kernel variant) and a key whose config changed
    mm = "BM: 128, BN: 128, BK: 32, num_warps: 8, num_stages: 5"
    a["autotune"] = [
        dict(kernel="_expert_mm_kernel", key={"I": 1024, "O": 128, "ROW_DOT": False}, config=mm),
        dict(kernel="_weight_grad_kernel", key={"I": 1024, "O": 128}, config="BI: 128"),
    ]
    b["autotune"] = [
        dict(kernel="_expert_mm_kernel", key={"I": 1024, "O": 128, "ROW_DOT": False}, config=mm),
        dict(kernel="_expert_mm_kernel", key={"I": 1024, "O": 128, "ROW_DOT": True}, config=mm),
        dict(kernel="_weight_grad_kernel", key={"I": 1024, "O": 128}, config="BI: 64"),
    ]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    profile_diff.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--top", "1"])
    out = capsys.readouterr().out.split("autotuning keys whose config differs: ")[1].splitlines()
    assert out[0] == "2"
    assert out[1].strip() == "_expert_mm_kernel {'I': 1024, 'O': 128, 'ROW_DOT': True}" and out[2].strip() == "A: -"
    assert out[4].strip() == "_weight_grad_kernel {'I': 1024, 'O': 128}" and out[6].strip() == "B: BI: 64"
    # anything but a profile_step.py --json file is refused by name
    (tmp_path / "c.json").write_text(json.dumps({"results": []}))
    with pytest.raises(SystemExit, match="not a profile_step.py --json file"):
        profile_diff.main([str(tmp_path / "a.json"), str(tmp_path / "c.json")])


def test_autotune_choices_report_each_key_and_its_config():
    """`triton_weight_grad.autotune_choices`: a kernel with several configs reports each autotuning key
    it has met (named by the key arguments; Triton's appended dtypes dropped) with the chosen config;
    a kernel with one config (the interpreter's) reports that config."""
    pytest.importorskip("triton")
    from types import SimpleNamespace
    from moeut.kernels.weight_grad import autotune_choices

    tuned = SimpleNamespace(
        fn=SimpleNamespace(__name__="_expert_mm_kernel"),
        configs=["c1", "c2"],
        keys=["I", "O"],
        cache={(1024, 128, "torch.bfloat16"): "c2", (128, 1024, "torch.bfloat16"): "c1"},
    )
    single = SimpleNamespace(fn=SimpleNamespace(__name__="_weight_grad_kernel"), configs=["c0"], keys=["I"], cache={})
    assert autotune_choices([tuned, single]) == [
        ("_expert_mm_kernel", {"I": 1024, "O": 128}, "c2"),
        ("_expert_mm_kernel", {"I": 128, "O": 1024}, "c1"),
        ("_weight_grad_kernel", None, "c0"),
    ]
    from moeut.kernels import expert_mm as triton_expert_mm

    if triton_expert_mm.INTERPRET:  # the real kernels: one config each in the interpreter
        assert [(name, key) for name, key, _ in autotune_choices()] == [
            ("_expert_mm_kernel", None),
            ("_weight_grad_kernel", None),
        ]


def test_every_ffn_pass_compiles_to_hopper_wgmma_without_a_gpu(tmp_path):
    """compile_sm90.py compiles each σ-MoE FFN pass (moeut's own launches at the 244M shapes, the first
    tile config that fits), and the LayerNorm and routing kernels, for sm_90 on this CPU machine: each
    dot must become Hopper's warp-group MMA fed by asynchronous copies, within the shared memory a
    Hopper block may use. A kernel change that
    falls back to mma.sync, loses its copy pipeline or outgrows shared memory fails here, before it
    costs device time. (A subprocess: the tests run the kernels' interpreter, which compiles nothing.)"""
    import os
    import subprocess

    pytest.importorskip("triton.backends.nvidia.driver")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "sm90.json"
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "compile_sm90.py"), "--first-config", "--glue", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {r["pass_"] for r in report["rows"]} == {"up fwd", "down fwd", "down dx", "up dx", "up dW", "down dW"}
    for r in report["rows"]:
        assert r["wgmma"] and not r["mma_sync"], r
        assert r["async_copies"] + r["tma_copies"] > 0, r
        assert 0 < r["shared_bytes"] <= report["shared_limit"], r
        assert f"{r['pass_']:9s} {r['config']:28s} wgmma" in run.stdout  # and the table says so
    # the LayerNorm and router-statistics kernels compile for sm_90 too, within shared memory
    assert [r["pass_"] for r in report["glue"]] == [
        "_layer_norm_fwd_kernel",
        "_layer_norm_bwd_kernel",
        "_layer_norm_sum_partials_kernel",
        "_prob_sum_kernel",
        "_router_backward_kernel",
    ]
    for r in report["glue"]:
        assert 0 < r["shared_bytes"] <= report["shared_limit"], r


def test_the_device_scripts_parse_and_refuse_an_unknown_stage(tmp_path):
    """gpu.sh and quality.sh are valid bash; gpu.sh names the stages it knows when given another."""
    import os
    import subprocess

    for script in ("gpu.sh", "quality.sh"):
        subprocess.run(["bash", "-n", str(BENCHMARKS / script)], check=True)
    r = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu.sh"), "nonsense"],
        capture_output=True,
        text=True,
        env=dict(os.environ, OUT=str(tmp_path)),
        cwd=BENCHMARKS.parent,
    )
    assert r.returncode == 2 and "unknown stage nonsense" in r.stderr
