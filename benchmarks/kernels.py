"""The outer sync's fused kernels against their torch reference, eager and under torch.compile.

    python benchmarks/kernels.py                       # on the GPU, if there is one
    python benchmarks/kernels.py --device cpu          # the reference's figures on the CPU
    python benchmarks/kernels.py --step-config configs/gpu-1b.yaml   # + a 1B model's whole outer sync vs its inner step
    python benchmarks/kernels.py --train configs/tiny.yaml --set ...  # + training with the kernels vs the reference

For each operation and fragment size: the median time, the bytes it must move per element (each
input read once, each output written once), the bandwidth that is, and its fraction of the
device's memory bandwidth (its datasheet figure, and what a plain device copy reaches here).
Writes `results.json` and `bandwidth.png` under `benchmarks/results/kernels/<device>/`.

The operations, on one fragment of N fp32 values:
  encode   pseudo-gradient + e3m0 encode: read global and live, write 4-bit codes and block scales
  mean     decode + fp32 weighted mean of 4 regions' e3m0 payloads
  outer    outer Nesterov step + CoCoDC merge (running normaliser): read grad, global, momentum,
           live, theta_send, normaliser; write global, momentum, live, normaliser
  adam     the same with the AdamW weight (the default): read grad, global, momentum, live,
           theta_send and the per-element curvature; write global, momentum, live
  stream   outer Nesterov step + Streaming DiLoCo's lerp merge
  drift    the square sum of global - live (the adaptive schedule's drift)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cocodc import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cocodc import kernels  # noqa: E402
from cocodc.comm.codec import get_codec  # noqa: E402
from cocodc.config import SyncConfig  # noqa: E402

from sweep import ROOT  # noqa: E402

REGIONS = 4
CODEC = get_codec("e3m0")
# Datasheet memory bandwidth (bytes/s) by the name torch reports.
DATASHEET = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.04e12}
OUTER_OPTIONS = {"lr": 0.7, "mu": 0.9, "nesterov": True, "first": False, "alpha": 0.5}
ADAM_LAMBDA = SyncConfig(method="cocodc").compensation_lambda  # the AdamW weight's default


def payload_bytes(n: int) -> float:
    return CODEC.encoded_bytes(n) / n


BYTES_PER_ELEMENT = {
    "encode": lambda n: 8 + payload_bytes(n),
    "mean": lambda n: REGIONS * payload_bytes(n) + 4,
    "outer": lambda n: 6 * 4 + 4 * 4,
    "adam": lambda n: 6 * 4 + 3 * 4,
    "stream": lambda n: 4 * 4 + 3 * 4,
    "drift": lambda n: 8,
}


def buffers(n: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)

    def draw(scale: float) -> torch.Tensor:
        return torch.randn(n, generator=g, device=device) * scale

    base = draw(1.0)
    live = base + draw(0.01)
    code_bytes = CODEC.encoded_bytes(n)
    rows = torch.zeros(REGIONS, -(-code_bytes // 4) * 4, dtype=torch.uint8, device=device)  # word rows, as the engine's
    for row in rows:
        row[:code_bytes] = CODEC.encode(draw(0.01))
    return {
        "grad": draw(1e-3), "global_": base, "momentum": draw(1e-3), "live": live, "sent": live + draw(1e-3),
        "normaliser": draw(1e-4).abs(), "curvature": draw(1e-4).abs(), "rows": rows,
    }  # fmt: skip


def operations(b: dict[str, torch.Tensor], n: int) -> dict[str, Callable[[], object]]:
    """Each operation as a closure over the buffers, through `cocodc.kernels` (whose backend says
    kernel or reference)."""
    state = {k: b[k] for k in ("grad", "global_", "momentum", "live")}
    weights = [1.0] * REGIONS
    return {
        "encode": lambda: kernels.encode(CODEC, b["global_"], b["live"]),
        "mean": lambda: kernels.decode_sum(CODEC, b["rows"], n, weights, True),
        "outer": lambda: kernels.outer_apply(
            **state,
            merge="compensate",
            sent=b["sent"],
            dc_lambda=0.5,
            normaliser=b["normaliser"],
            beta=0.9,
            **OUTER_OPTIONS,
        ),  # fmt: skip
        "adam": lambda: kernels.outer_apply(
            **state,
            merge="compensate",
            sent=b["sent"],
            dc_lambda=ADAM_LAMBDA,
            curvature=b["curvature"],
            **OUTER_OPTIONS,
        ),
        "stream": lambda: kernels.outer_apply(**state, merge="lerp", **OUTER_OPTIONS),
        "drift": lambda: kernels.square_sums([(b["global_"], b["live"])]),
    }


def reference_for_compile(b: dict[str, torch.Tensor], n: int) -> dict[str, Callable[[], object]]:
    """The reference's arithmetic as plain tensor functions torch.compile can trace whole (the
    eager path's host reads of w's statistics would break its graph)."""
    from cocodc.kernels.reference import outer_sgd_step

    def outer() -> None:
        outer_sgd_step(b["global_"], b["momentum"], b["grad"], 0.7, 0.9, True, False)
        delta = b["live"] - b["sent"]
        b["normaliser"].lerp_(delta.square(), 0.1)
        w = (delta.square() * 0.5 / b["normaliser"].clamp_min(1e-38)).clamp(0, 1)
        theta = b["global_"] + delta - w * (b["global_"] - b["sent"])
        b["live"].copy_(torch.lerp(theta, b["live"], 0.5))

    def adam() -> None:
        outer_sgd_step(b["global_"], b["momentum"], b["grad"], 0.7, 0.9, True, False)
        w = (b["curvature"] * ADAM_LAMBDA).clamp(max=0.9)
        theta = b["global_"] + (b["live"] - b["sent"]) - w * (b["global_"] - b["sent"])
        b["live"].copy_(torch.lerp(theta, b["live"], 0.5))

    def stream() -> None:
        outer_sgd_step(b["global_"], b["momentum"], b["grad"], 0.7, 0.9, True, False)
        b["live"].copy_(torch.lerp(b["global_"], b["live"], 0.5))

    def mean() -> torch.Tensor:
        code_bytes = CODEC.encoded_bytes(n)
        return sum(CODEC.decode(row[:code_bytes], n) for row in b["rows"]) / REGIONS

    return {
        "encode": lambda: CODEC.encode(b["global_"] - b["live"]),
        "mean": mean,
        "outer": outer,
        "adam": adam,
        "stream": stream,
        "drift": lambda: (b["global_"] - b["live"]).square().sum(),
    }


def median_s(fn: Callable[[], object], device: str, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """Bytes/s a device-to-device copy of 256M fp32 reaches (read + write)."""
    n = 1 << 28 if device == "cuda" else 1 << 24
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    return 8 * n / median_s(lambda: dst.copy_(src), device, 10)


def measure(sizes: list[int], device: str, paths: list[str], repeats: int) -> list[dict]:
    rows = []
    for n in sizes:
        b = buffers(n, device)
        for path in paths:
            if path == "compiled":  # compiled afresh per size (the warm-up runs pay for it): a new graph anyway
                kernels.set_backend("torch")
                ops = {name: torch.compile(fn) for name, fn in reference_for_compile(b, n).items()}
            else:
                kernels.set_backend({"fused": "triton", "eager": "torch"}[path])
                ops = operations(b, n)
            for name, fn in ops.items():
                seconds = median_s(fn, device, repeats)
                moved = BYTES_PER_ELEMENT[name](n)
                rows.append({"op": name, "path": path, "numel": n, "seconds": seconds, "bytes_per_element": moved,
                             "bandwidth": moved * n / seconds})  # fmt: skip
                print(f"{name:7s} {path:9s} {n:>11,d}  {seconds * 1e3:9.3f} ms  {moved * n / seconds / 1e9:8.1f} GB/s",
                      file=sys.stderr, flush=True)  # fmt: skip
        del b
        if device == "cuda":
            torch.cuda.empty_cache()
    kernels.set_backend("auto")
    return rows


def whole_sync_vs_inner_step(config_file: str, device: str, repeats: int) -> dict:
    """A 1B-parameter model's whole outer sync on one region's GPU (drift of every fragment, then
    per fragment: pseudo-gradient + encode, the mean of the regions' payloads, outer step + merge;
    the WAN transfer left out) against one inner step of that config (bf16 autocast, AdamW)."""
    from cocodc.config import load_config
    from cocodc.model import Transformer, lm_loss
    from cocodc.sync import OuterSync
    from cocodc.trainer import autocast_for, inner_optimizer

    config = load_config(config_file, [])
    torch.manual_seed(0)
    model = Transformer(config.model, config.data.vocab_size, config.train.seq_len).to(device)
    optimizer = inner_optimizer(model, config)
    batch = torch.randint(0, config.data.vocab_size, (config.train.batch_size, config.train.seq_len + 1), device=device)

    def inner_step() -> None:
        with autocast_for(config, torch.device(device)):
            loss = lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = median_s(inner_step, device, repeats)
    optimizer.state.clear()  # frees AdamW's moments for the outer sync's buffers
    fragments = max(1, config.model.n_layers // 6)
    sync = SyncConfig(
        method="cocodc", sync_every=100 * fragments, fragments=fragments, quantize="e3m0", dc_normaliser="running"
    )
    outer = OuterSync(model, sync)
    weights = [1.0] * config.topology.regions
    for flat in outer.flat:  # the momentum and normaliser as after a few syncs
        flat.momentum.normal_(0, 1e-3)
        flat.normaliser.uniform_(1e-6, 1e-4)
        flat.sent.copy_(flat.live)

    def whole_sync() -> None:
        kernels.square_sums([(f.global_, f.live) for f in outer.flat]).tolist()
        for flat in outer.flat:
            payload = kernels.encode(CODEC, flat.global_, flat.live)
            mean = kernels.decode_sum(CODEC, payload.expand(len(weights), -1), flat.numel, weights, True)
            kernels.outer_apply(
                mean, flat.global_, flat.momentum, flat.live, merge="compensate", sent=flat.sent, dc_lambda=0.5,
                normaliser=flat.normaliser, beta=0.9, **OUTER_OPTIONS,
            )  # fmt: skip

    result = {"config": config_file, "parameters": sum(f.numel for f in outer.flat), "fragments": len(outer.flat),
              "regions": len(weights), "inner_step_s": step_s}  # fmt: skip
    for path, backend in (("fused", "triton"), ("eager", "torch")):
        kernels.set_backend(backend)
        result[f"sync_{path}_s"] = median_s(whole_sync, device, repeats)
    kernels.set_backend("auto")
    return result


def training_runs(config_file: str, settings: list[str], scratch: Path) -> dict:
    """`cocodc train` with the kernels, and twice with the reference: how far the kernels move the
    run (final eval loss, the global copy) beside how far the reference moves from itself (on a
    GPU, backward passes that accumulate with atomics are not bit-reproducible)."""
    from sweep import train_run

    runs = {"kernels": "auto", "reference": "torch", "reference-again": "torch"}
    finals = {}
    for name, backend in runs.items():
        entry = train_run(
            config_file, [*settings, f"train.kernels={backend}", f"run.dir={scratch}", f"run.name={name}"], scratch,
            name, rerun=True,
        )  # fmt: skip
        if entry["rc"]:
            raise SystemExit(f"{name} run failed (exit {entry['rc']})")
        summary = json.loads((scratch / name / "summary.json").read_text())
        root = scratch / name / "checkpoints"
        state = checkpoint.read_region(root, checkpoint.latest_step(root), 0)
        copy = torch.cat([t.reshape(-1) for t in state["outer"]["global_params"].values()])
        finals[name] = (summary["final_eval_loss"], copy, summary["kernels"])

    def apart(a: str, b: str) -> dict:
        (loss_a, copy_a, _), (loss_b, copy_b, _) = finals[a], finals[b]
        return {"eval_loss": abs(loss_a - loss_b), "max_abs": float((copy_a - copy_b).abs().max()),
                "rms_rel": float((copy_a - copy_b).norm() / copy_b.norm())}  # fmt: skip

    return {
        "config": config_file, "settings": settings,
        "final_eval_loss": {name: loss for name, (loss, _, _) in finals.items()},
        "kernels": {name: served for name, (_, _, served) in finals.items()},
        "kernels_vs_reference": apart("kernels", "reference"),
        "reference_vs_reference": apart("reference-again", "reference"),
    }  # fmt: skip


def table(rows: list[dict], peak: float | None, copy: float) -> str:
    lines = ["| op | numel | path | ms | bytes/elt | GB/s | of copy | of datasheet |", "|---" * 8 + "|"]
    for r in rows:
        sheet = f"{r['bandwidth'] / peak:.0%}" if peak else "-"
        lines.append(
            f"| {r['op']} | {r['numel']:,} | {r['path']} | {r['seconds'] * 1e3:.3f} | {r['bytes_per_element']:.2f} "
            f"| {r['bandwidth'] / 1e9:.0f} | {r['bandwidth'] / copy:.0%} | {sheet} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], peak: float | None, copy: float, path: Path, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted({r["op"] for r in rows}, key=list(BYTES_PER_ELEMENT).index)
    fig, axes = plt.subplots(1, len(ops), figsize=(3.2 * len(ops), 3.4), sharey=True)
    scale = peak or copy
    for ax, op in zip(axes, ops, strict=True):
        for path_name, style in (("fused", "o-"), ("compiled", "s--"), ("eager", "^:")):
            mine = [r for r in rows if r["op"] == op and r["path"] == path_name]
            if mine:
                ax.plot([r["numel"] for r in mine], [r["bandwidth"] / scale for r in mine], style, label=path_name)
        ax.axhline(copy / scale, color="grey", lw=0.8, label="device copy")
        ax.set_xscale("log")
        ax.set_title(op)
        ax.set_xlabel("fragment elements")
    axes[0].set_ylabel("fraction of " + ("datasheet" if peak else "copy") + " bandwidth")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"outer-sync kernels on {device_name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--sizes", default=None, help="comma-separated element counts")
    parser.add_argument("--paths", default=None, help="comma-separated: fused, eager, compiled")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--step-config", default=None, help="also time a model's whole outer sync vs its inner step")
    parser.add_argument("--train", default=None, metavar="CONFIG", help="also train with the kernels vs the reference")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="settings for --train")
    parser.add_argument("--out", default=None)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    device = args.device
    kernel_here = device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    default_sizes = [1_000_000, 10_000_000, 100_000_000, 500_000_000] if device == "cuda" else [1_000_000, 10_000_000]
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else default_sizes
    default_paths = ["fused", "eager", "compiled"] if kernel_here else ["eager", "compiled"]
    paths = args.paths.split(",") if args.paths else default_paths
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((bw for key, bw in DATASHEET.items() if key in name), None) if device == "cuda" else None
    copy = copy_bandwidth(device)
    print(f"{name}: a device copy moves {copy / 1e9:.0f} GB/s" + (f"; datasheet {peak / 1e9:.0f} GB/s" if peak else ""))
    rows = measure(sizes, device, paths, args.repeats)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "kernels" / name.replace(" ", "-")
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": name, "torch": torch.__version__, "datasheet_bandwidth": peak, "copy_bandwidth": copy,
              "rows": rows}  # fmt: skip
    if args.step_config:
        result["whole_sync"] = whole_sync_vs_inner_step(args.step_config, device, max(3, args.repeats // 2))
    if args.train:
        result["training"] = training_runs(args.train, args.set, out / "train")
    print(table(rows, peak, copy))
    if "training" in result:
        t = result["training"]
        print(f"\ntraining {t['config']} {' '.join(t['settings'])}: final eval loss {t['final_eval_loss']}")
        print(f"kernels vs reference: {t['kernels_vs_reference']}")
        print(f"reference vs itself:  {t['reference_vs_reference']}")
    if "whole_sync" in result:
        w = result["whole_sync"]
        print(
            f"\n{w['parameters'] / 1e9:.2f}B parameters in {w['fragments']} fragments, {w['regions']} regions: "
            f"inner step {w['inner_step_s'] * 1e3:.1f} ms; whole outer sync fused {w['sync_fused_s'] * 1e3:.1f} ms, "
            f"eager {w['sync_eager_s'] * 1e3:.1f} ms"
        )
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plot(rows, peak, copy, out / "bandwidth.png", name)
    print(f"wrote {out}/results.json and bandwidth.png")


if __name__ == "__main__":
    main()
