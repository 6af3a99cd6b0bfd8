"""Side-by-side check against the official MoEUT release: same weights, same input, compare logits,
reg_loss and every gradient; also check that official state dicts load into ours with strict=True.

    python benchmarks/compare_official.py --official /path/to/official/moeut/repo [--device cuda]
    python benchmarks/compare_official.py --official /path/to/official/moeut/repo --run runs/imported

The official code is loaded from the given path (it is not part of this project). On a CPU its Triton
CVMM kernel cannot run, so it is replaced by an autograd-capable emulation of that kernel's indexing
(`_emulated_cvmm`); on CUDA the official kernel itself runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moeut


def load_official(repo: Path):
    pkg = repo / "moeut"
    spec = importlib.util.spec_from_file_location(
        "official_moeut", pkg / "__init__.py", submodule_search_locations=[str(pkg)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["official_moeut"] = mod
    spec.loader.exec_module(mod)
    prof = importlib.util.spec_from_file_location("official_profiles", repo / "profiles.py")
    profiles = importlib.util.module_from_spec(prof)
    prof.loader.exec_module(profiles)
    return mod, profiles


def _emulated_cvmm(x, sel, keys):
    """What the official CVMM kernel computes, in plain autograd-capable PyTorch (for CPU runs)."""
    x_flat = x.reshape(-1, x.shape[-1])
    rows = x_flat[sel.sel_index.reshape(-1).long()]
    vals = torch.bmm(rows.unsqueeze(1), keys[sel.sel.reshape(-1).long()]).squeeze(1)
    out_rows = (sel.sel_index if sel.out_index is None else sel.out_index).reshape(-1)
    out = torch.zeros(sel.sel.numel(), keys.shape[-1], dtype=vals.dtype, device=vals.device)
    out = out.index_copy(0, out_rows.long(), vals).view(*sel.raw_sel.shape, keys.shape[-1])
    if sel.reduction_weight is not None:
        out = out.view(*sel.reduction_weight.shape, out.shape[-1])
        out = (sel.reduction_weight.unsqueeze(-2).type_as(out) @ out).squeeze(-2)
    return out


def compare(off_mod, cfg: dict, vocab: int, device: str, B: int = 2, T: int = 48, seed: int = 0):
    torch.manual_seed(seed)
    ref = off_mod.MoEUTLM(vocab, **cfg).to(device)
    ours = moeut.MoEUTLM(vocab, **cfg).to(device)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.train()
    ours.train()
    tokens = torch.randint(0, vocab, (B, T + 1), device=device)
    results = {}
    outs = []
    for m in (ref, ours):
        out = m(tokens[:, :-1])
        loss = F.cross_entropy(out.outputs.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        (loss + out.reg_loss.sum()).backward()
        outs.append(out)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    results["logits_rel"] = rel(outs[1].outputs, outs[0].outputs)
    results["reg_loss_rel"] = abs(outs[1].reg_loss.item() - outs[0].reg_loss.item()) / max(
        abs(outs[0].reg_loss.item()), 1e-30
    )
    ref_params = dict(ref.named_parameters())
    results["grad_rel_max"] = max(rel(p.grad, ref_params[n].grad) for n, p in ours.named_parameters())
    return results


def compare_run(off_mod, run: Path, device: str, B: int = 2, T: int = 64, seed: int = 0) -> dict:
    """A MoEUT run of ours (e.g. one made by `moeut import-official`) against the official release holding
    the same weights: its state dict loads strictly and the eval-mode logits agree."""
    from moeut.models import model_kwargs_of_run
    from moeut.runs import load_run

    ours, tok, meta = load_run(run, device)
    if not meta["model"].startswith("moeut"):
        raise SystemExit(f"{run} is a {meta['model']} run: the official release has MoEUT models only")
    kwargs = {k: v for k, v in model_kwargs_of_run(meta).items() if k not in ("group_type", "layer_norm")}
    ref = off_mod.MoEUTLM(tok.vocab_size, **kwargs).to(device)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref.eval()
    torch.manual_seed(seed)
    tokens = torch.randint(0, tok.vocab_size, (B, T), device=device)
    with torch.no_grad():
        a, b = ours(tokens).outputs, ref(tokens).outputs
    return {
        "logits_rel": ((a.double() - b.double()).norm() / b.double().norm()).item(),
        "argmax_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", type=Path, required=True, help="path to a checkout of the official release")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--run", type=Path, help="compare this MoEUT run's weights (e.g. an imported checkpoint) instead")
    args = ap.parse_args()
    off_mod, off_profiles = load_official(args.official)
    if args.device == "cpu":
        off_mod.moeut.cvmm = _emulated_cvmm
    if args.run:
        r = compare_run(off_mod, args.run, args.device)
        ok = r["logits_rel"] < 1e-5
        print(
            f"{args.run}: logits rel {r['logits_rel']:.2e}, argmax agreement {r['argmax_agree']:.4f}: "
            f"{'PARITY OK' if ok else 'PARITY FAILED'} (threshold 1e-5 relative, fp32)"
        )
        sys.exit(0 if ok else 1)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cases = {
        "tiny-switchhead": dict(
            d_model=64,
            n_layers=4,
            n_heads=4,
            ff_n_experts=16,
            att_n_experts=4,
            d_head=16,
            ff_k=4,
            group_size=2,
            ff_expert_size=16,
        ),
        "tiny-dense-attention": dict(
            d_model=64,
            n_layers=4,
            n_heads=4,
            ff_n_experts=16,
            att_n_experts=1,
            d_head=16,
            ff_k=4,
            group_size=2,
            ff_expert_size=16,
        ),
        "tiny-group3": dict(
            d_model=48,
            n_layers=6,
            n_heads=2,
            ff_n_experts=12,
            att_n_experts=3,
            d_head=24,
            ff_k=3,
            group_size=3,
            ff_expert_size=8,
        ),
    }
    if args.device != "cpu":
        cases["MoEUT_244M"] = dict(off_profiles.MoEUT_244M)
    all_res = {}
    print(f"{'case':24s} {'logits rel':>12s} {'reg_loss rel':>13s} {'max grad rel':>13s}")
    for name, cfg in cases.items():
        r = compare(off_mod, cfg, 500 if "tiny" in name else 8000, args.device)
        all_res[name] = r
        print(f"{name:24s} {r['logits_rel']:12.2e} {r['reg_loss_rel']:13.2e} {r['grad_rel_max']:13.2e}")
    ok = all(r["logits_rel"] < 1e-5 and r["reg_loss_rel"] < 1e-5 and r["grad_rel_max"] < 1e-5 for r in all_res.values())
    print("PARITY", "OK" if ok else "FAILED", "(threshold 1e-5 relative, fp32)")
    if args.json:
        args.json.write_text(json.dumps(all_res, indent=2))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
