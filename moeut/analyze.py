"""`moeut analyze`: what the experts of a trained run do, in figures and numbers.

One forward pass over held-out text, layer application by layer application (a MoEUT layer of a group
is applied n_layers / G times), records for every token
  * the σ-MoE FFN's chosen experts, and SwitchHead's value and output experts per head;
  * the residual stream's norm entering the application and the norm of the update it adds.
From these:
  usage      the share of selections each expert gets, per application; its entropy (1 = uniform) and
             the experts never selected;
  overlap    for the same token, the intersection over union of its FFN experts at two applications of
             the same layer (the paper's question: does a shared layer do different work at each depth?);
  diversity  per token type, how many distinct FFN experts its occurrences get, against its frequency;
  residual   mean norm of the residual stream and relative update size per application (the paper's
             update-magnitude analysis), for a dense run too, and both side by side with --compare.
Shape suffixes follow the package legend.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from moeut.attention import AttentionMask
from moeut.dense import DenseLM
from moeut.model import MoEUTLM
from moeut.router import chosen_experts


@torch.no_grad()
def trace(model: torch.nn.Module, tokens_BT: Tensor) -> Dict[str, Any]:
    """Per layer application: "layer" (the distinct layer applied), "ffn" [N, K] and "att_o" / "att_v"
    [N, H, K] expert ids (MoEUT), "norm_in" and "update" [N] (N = B*T tokens)."""
    was_training = model.training
    model.eval()
    try:
        return _trace(model, tokens_BT)
    finally:
        model.train(was_training)


def _trace(model: torch.nn.Module, tokens_BT: Tensor) -> Dict[str, Any]:
    B, T = tokens_BT.shape
    mask = AttentionMask(None, None, is_causal=True)
    apps: List[Dict[str, Any]] = []
    if isinstance(model, MoEUTLM):
        x = model.embedding(tokens_BT)
        backbone = model.transformer
        for _, li in backbone.application_order():
            layer = backbone.layers[li]
            out, _, f_log, a_log = layer.forward_with_logits(x, mask, None)
            app = {"layer": li, "ffn": chosen_experts(f_log.logits, layer.ffn.n_heads).reshape(B * T, -1)}
            o_log, v_log = tuple(a_log) if a_log is not None else (None, None)
            k_att = getattr(layer.attention, "moe_k", 1)
            for name, log in (("att_o", o_log), ("att_v", v_log)):
                if log is not None and getattr(log, "logits", None) is not None and log.logits.dim() == 4:
                    app[name] = chosen_experts(log.logits, k_att).reshape(B * T, *log.logits.shape[2:3], -1)
            _residual(app, x, out)
            apps.append(app)
            x = out
    elif isinstance(model, DenseLM):
        x = model.embedding(tokens_BT) * model.embedding_scale
        for li, layer in enumerate(model.layers):
            out, _ = layer(x, mask, None)
            app = {"layer": li}
            _residual(app, x, out)
            apps.append(app)
            x = out
    else:
        raise ValueError(f"cannot analyze a {type(model).__name__}: MoEUTLM and DenseLM runs only")
    return {"tokens": tokens_BT.reshape(-1), "applications": apps}


def _residual(app: Dict[str, Any], x_in: Tensor, x_out: Tensor) -> None:
    x_in, x_out = x_in.float().flatten(0, 1), x_out.float().flatten(0, 1)
    app["norm_in"] = x_in.norm(dim=-1)
    app["update"] = (x_out - x_in).norm(dim=-1)


def usage_stats(ids_NK: Tensor, n_experts: int) -> Dict[str, Any]:
    counts = torch.bincount(ids_NK.reshape(-1), minlength=n_experts).double()
    share = counts / counts.sum()
    nz = share[share > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(n_experts)) if n_experts > 1 else 1.0
    return {"share": share.tolist(), "entropy": entropy, "never_selected": int((counts == 0).sum())}


def overlap(ids_a_NK: Tensor, ids_b_NK: Tensor, n_experts: int) -> float:
    """Mean over tokens of |A ∩ B| / |A ∪ B| of the two expert sets a token gets."""

    def as_mask(ids_NK: Tensor) -> Tensor:
        mask = torch.zeros(ids_NK.shape[0], n_experts, dtype=torch.bool, device=ids_NK.device)
        return mask.scatter_(1, ids_NK, True)

    a, b = as_mask(ids_a_NK), as_mask(ids_b_NK)
    inter = (a & b).sum(1).double()
    union = (a | b).sum(1).double()
    return float((inter / union.clamp(min=1)).mean())


def diversity(tokens_N: Tensor, ids_NK: Tensor, n_experts: int) -> Dict[int, Dict[str, int]]:
    """{token id: {"count": occurrences, "distinct": distinct experts over its occurrences}}."""
    tokens, inverse = torch.unique(tokens_N, return_inverse=True)
    counts = torch.bincount(inverse, minlength=len(tokens))
    pairs = torch.unique(inverse[:, None] * n_experts + ids_NK)  # each (token type, expert) once
    distinct = torch.bincount(pairs // n_experts, minlength=len(tokens))
    return {t: {"count": c, "distinct": d} for t, c, d in zip(tokens.tolist(), counts.tolist(), distinct.tolist())}


def analyze(model: torch.nn.Module, tokens_BT: Tensor) -> Dict[str, Any]:
    """The numbers behind the figures (plain data, for the JSON)."""
    tr = trace(model, tokens_BT)
    apps = tr["applications"]
    res: Dict[str, Any] = {
        "model": type(model).__name__,
        "tokens": int(tokens_BT.numel()),
        "applications": len(apps),
        "residual": [
            {
                "layer": a["layer"],
                "norm_in": float(a["norm_in"].mean()),
                "update": float(a["update"].mean()),
                "relative_update": float((a["update"] / a["norm_in"].clamp(min=1e-6)).mean()),
            }
            for a in apps
        ],
    }
    if not isinstance(model, MoEUTLM):
        return res
    backbone = model.transformer
    E = backbone.layers[0].ffn.n_experts
    res["ffn_usage"] = [{"layer": a["layer"], **usage_stats(a["ffn"], E)} for a in apps]
    att = []
    for a in apps:
        row = {"layer": a["layer"]}
        for name in ("att_o", "att_v"):
            if name in a:
                E_att = backbone.layers[a["layer"]].attention.n_experts
                row[name] = [usage_stats(a[name][:, h], E_att) for h in range(a[name].shape[1])]
        att.append(row)
    res["attention_usage"] = att
    G = len(backbone.layers)
    res["overlap"] = {}
    for li in range(G):
        mine = [a["ffn"] for a in apps if a["layer"] == li]
        res["overlap"][str(li)] = [[overlap(p, q, E) for q in mine] for p in mine]
    tokens_N = tr["tokens"]
    per_app = [diversity(tokens_N, a["ffn"], E) for a in apps]
    res["diversity"] = {
        str(t): {"count": per_app[0][t]["count"], "distinct_mean": float(np.mean([d[t]["distinct"] for d in per_app]))}
        for t in per_app[0]
    }
    return res


def training_summary(model: torch.nn.Module, tokens_BT: Tensor) -> Dict[str, Any]:
    """The few numbers the trainer logs at each evaluation (scalars) and the FFN usage image
    ("ffn_usage_image": [applications, experts], each row scaled to its maximum)."""
    res = analyze(model, tokens_BT)
    out: Dict[str, Any] = {
        "residual_norm_last": res["residual"][-1]["norm_in"],
        "relative_update_mean": float(np.mean([r["relative_update"] for r in res["residual"]])),
    }
    if "ffn_usage" in res:
        out["expert_usage_entropy"] = float(np.mean([u["entropy"] for u in res["ffn_usage"]]))
        out["experts_never_selected"] = float(np.mean([u["never_selected"] for u in res["ffn_usage"]]))
        for li, m in res["overlap"].items():
            m = np.array(m)
            if len(m) > 1:
                out[f"expert_overlap_layer{li}"] = float(m[~np.eye(len(m), dtype=bool)].mean())
        share = np.array([u["share"] for u in res["ffn_usage"]])
        out["ffn_usage_image"] = share / np.maximum(share.max(1, keepdims=True), 1e-12)
    return out


def summary(res: Dict[str, Any], other: Optional[Dict[str, Any]] = None) -> str:
    """What a person reads first."""
    lines = [f"{res['model']}: {res['tokens']} tokens, {res['applications']} layer applications"]
    r = res["residual"]
    lines.append(
        f"residual norm {r[0]['norm_in']:.2f} -> {r[-1]['norm_in']:.2f}; relative update "
        f"{min(x['relative_update'] for x in r):.3f} to {max(x['relative_update'] for x in r):.3f}"
    )
    if "ffn_usage" in res:
        ent = [u["entropy"] for u in res["ffn_usage"]]
        never = [u["never_selected"] for u in res["ffn_usage"]]
        lines.append(
            f"FFN expert usage entropy (1 = uniform): {min(ent):.3f} to {max(ent):.3f}; never selected per "
            f"application: {min(never)} to {max(never)}"
        )
        for li, m in res["overlap"].items():
            m = np.array(m)
            off = m[~np.eye(len(m), dtype=bool)]
            if off.size:
                lines.append(
                    f"layer {li}: same-token expert overlap between its applications "
                    f"{off.mean():.3f} (min {off.min():.3f}, max {off.max():.3f})"
                )
        div = res["diversity"]
        frequent = sorted(div.values(), key=lambda d: -d["count"])[:20]
        lines.append(
            "the 20 most frequent tokens get on average "
            f"{np.mean([d['distinct_mean'] for d in frequent]):.1f} distinct FFN experts each"
        )
    if other is not None:
        lines.append(
            f"compared with {other['model']}: final residual norm {other['residual'][-1]['norm_in']:.2f}, "
            f"relative update {np.mean([x['relative_update'] for x in other['residual']]):.3f} on average "
            f"(this run: {np.mean([x['relative_update'] for x in r]):.3f})"
        )
    return "\n".join(lines)


def write_figures(
    res: Dict[str, Any], out: Path, other: Optional[Dict[str, Any]] = None, labels: Sequence[str] = ("run", "compare")
) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=130)
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for data, label in ((res, labels[0]), (other, labels[1])):
        if data is not None:
            x = range(1, len(data["residual"]) + 1)
            ax[0].plot(x, [r["norm_in"] for r in data["residual"]], marker=".", label=f"{label} ({data['model']})")
            ax[1].plot(x, [r["relative_update"] for r in data["residual"]], marker=".", label=label)
    ax[0].set(title="Residual stream norm entering each layer", xlabel="layer application", ylabel="mean ‖x‖")
    ax[1].set(title="Update size relative to the residual", xlabel="layer application", ylabel="mean ‖Δx‖ / ‖x‖")
    ax[0].legend(frameon=False)
    for a in ax:
        a.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # applications are whole numbers
    save(fig, "residual.png")
    if "ffn_usage" not in res:
        return written

    share = np.array([u["share"] for u in res["ffn_usage"]])
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(share) + 1.6))
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(
        title="σ-MoE expert usage per layer application (share of selections)",
        xlabel="expert",
        ylabel="layer application (layer id)",
    )
    ax.set_yticks(range(len(share)), [f"{i + 1} ({u['layer']})" for i, u in enumerate(res["ffn_usage"])])
    fig.colorbar(im, ax=ax, label="share")
    save(fig, "ffn_usage.png")

    G = len(res["overlap"])
    fig, axes = plt.subplots(1, G, figsize=(4.6 * G + 1, 3.6), squeeze=False)
    for ax, (li, m) in zip(axes[0], res["overlap"].items()):
        m = np.array(m)
        im = ax.imshow(m, vmin=0, vmax=1, cmap="magma")
        ax.set(title=f"layer {li}: FFN expert overlap", xlabel="application", ylabel="application")
        ax.set_xticks(range(len(m)), range(1, len(m) + 1))
        ax.set_yticks(range(len(m)), range(1, len(m) + 1))
        for i in range(len(m)):
            for j in range(len(m)):
                ax.text(
                    j,
                    i,
                    f"{m[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if m[i, j] < 0.6 else "black",
                )
    fig.colorbar(im, ax=list(axes[0]), label="mean IoU over tokens")
    fig.savefig(out / "ffn_overlap.png", dpi=130)
    plt.close(fig)
    written.append(out / "ffn_overlap.png")

    rows = [
        (i, name, h, u["share"])
        for i, a in enumerate(res["attention_usage"])
        for name in ("att_v", "att_o")
        if name in a
        for h, u in enumerate(a[name])
    ]
    if rows:
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.25 * len(rows) / 2 + 2.2))
        for ax, name in zip(axes, ("att_v", "att_o")):
            mine = [r for r in rows if r[1] == name]
            if not mine:
                ax.axis("off")
                continue
            im = ax.imshow(np.array([r[3] for r in mine]), aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set(
                title=f"SwitchHead {'value' if name == 'att_v' else 'output'} experts",
                xlabel="expert of the head",
                ylabel="(application, head)",
            )
            ax.set_yticks(range(len(mine)), [f"{r[0] + 1}, h{r[2]}" for r in mine], fontsize=6)
            fig.colorbar(im, ax=ax, label="share")
        save(fig, "attention_usage.png")

    div = res["diversity"]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.scatter([d["count"] for d in div.values()], [d["distinct_mean"] for d in div.values()], s=6, alpha=0.5)
    ax.set_xscale("log")
    ax.set(
        title="Distinct FFN experts a token type gets",
        xlabel="occurrences of the token",
        ylabel="distinct experts (mean over applications)",
    )
    save(fig, "token_diversity.png")
    return written


def write_report(
    res: Dict[str, Any], out: Path, other: Optional[Dict[str, Any]] = None, labels: Sequence[str] = ("run", "compare")
) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(res, out, other, labels)
    (out / "analysis.json").write_text(json.dumps({"run": res, "compare": other}, indent=1))
    return figures + [out / "analysis.json"]
