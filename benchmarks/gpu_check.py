"""GPU check: bf16 vs fp32 training throughput and MFU of a small GPT on synthetic tokens.

Run through ``benchmarks/gpu_check.sh`` on a machine with one NVIDIA GPU (≤ 5 minutes); writes
``benchmarks/results/gpu.json`` and ``gpu.md``. ``--smoke`` runs a tiny model on the CPU, to
check the script itself where there is no GPU.

MFU = FLOPs per step (counted with ``torch.utils.flop_counter``) x steps/s, divided by the
device's peak: measured here with a large bf16/fp32 GEMM, and (for known GPUs) the datasheet's
dense peak, both shown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kubetrain.train.instrument import peak_flops

RESULTS = Path(__file__).resolve().parent / "results"
# Dense (no sparsity) peaks from NVIDIA's datasheets, FLOP/s: (bf16, tf32, fp32).
DATASHEET = {"H100": (989e12, 494e12, 67e12), "H200": (989e12, 494e12, 67e12),
             "A100": (312e12, 156e12, 19.5e12)}  # fmt: skip


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def step_flops(model, idx, targets) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure(name, model, idx, targets, dtype, steps, warmup, sync) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=idx.is_cuda)
    autocast = torch.autocast(idx.device.type, dtype=dtype, enabled=dtype != torch.float32)
    times = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(model(idx).float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return {"name": name, "step_s": statistics.median(times), "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        size = {"vocab": 32000, "d": 1024, "layers": 12, "heads": 16, "seq": 1024, "batch": 16}
    else:
        size = {"vocab": 512, "d": 64, "layers": 2, "heads": 4, "seq": 64, "batch": 4}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    idx = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), device=device)
    targets = torch.roll(idx, -1, dims=1)
    gpu = torch.cuda.get_device_name() if cuda else "cpu (smoke)"
    results = {"device": gpu, "size": size, "torch": torch.__version__, "runs": []}
    flops = None
    for name, dtype, compiled, tf32 in (
        ("fp32", torch.float32, False, False),
        ("tf32", torch.float32, False, True),
        ("bf16 autocast", torch.bfloat16, False, True),
        ("bf16 autocast + torch.compile", torch.bfloat16, True, True),
    ):
        if not cuda and ((tf32 and dtype == torch.float32) or compiled):
            continue
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.manual_seed(0)
        model = GPT(size["vocab"], size["d"], size["layers"], size["heads"], size["seq"]).to(device)
        if flops is None:
            flops = step_flops(model, idx, targets)
            results["flops_per_step"] = flops
            results["parameters"] = sum(p.numel() for p in model.parameters())
        run = measure(name, torch.compile(model) if compiled else model, idx, targets, dtype,
                      args.steps, 5 if not compiled else 10, sync)  # fmt: skip
        run["tokens_per_s"] = size["batch"] * size["seq"] / run["step_s"]
        run["achieved_flops"] = flops / run["step_s"]
        peak = peak_flops(device.type, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
        run["mfu_vs_measured_peak"] = run["achieved_flops"] / peak
        sheet = next((v for k, v in DATASHEET.items() if k in gpu), None)
        if sheet:
            run["mfu_vs_datasheet"] = run["achieved_flops"] / (
                sheet[0] if dtype == torch.bfloat16 else sheet[1] if tf32 else sheet[2]
            )
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()
    if cuda:  # a smoke run on the CPU checks the script; its figures mean nothing
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "gpu.json").write_text(json.dumps(results, indent=2))
    lines = [f"## GPU check ({gpu})", "", f"Command: `benchmarks/gpu_check.sh`; GPT {size}, "
             f"{results['parameters'] / 1e6:.0f} M parameters, {flops / 1e12:.2f} TFLOP per step.", "",
             "| run | step (ms) | tokens/s | MFU vs measured peak | MFU vs datasheet |", "|---|---|---|---|---|"]  # fmt: skip
    for r in results["runs"]:
        sheet = f"{100 * r['mfu_vs_datasheet']:.1f} %" if "mfu_vs_datasheet" in r else "–"
        lines.append(f"| {r['name']} | {1e3 * r['step_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{100 * r['mfu_vs_measured_peak']:.1f} % | {sheet} |")  # fmt: skip
    if cuda:
        (RESULTS / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
