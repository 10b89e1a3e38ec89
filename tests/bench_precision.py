"""Benchmark (not part of the test run): what an AdamW step at the spec's learning rate does to Qwen3-0.6B-shaped
weights kept in bf16 ("pure bf16", Unsloth's default for a bf16 full fine-tune) vs fp32 master weights.

    .venv/bin/python tests/bench_precision.py [--steps 10] [--tiny]

The Qwen3-0.6B architecture is built from its config with random weights at its real init scale (normal, std
0.02; norms 1.0), one forward/backward of a 256-token sequence gives real gradients, then every weight tensor
takes `steps` AdamW steps (lr 2e-5, weight decay 0.01, the same gradient each step) twice: once stored in bf16
(moments in bf16 too, the update written into the bf16 weight), once as an fp32 master copy. Reported: the
fraction of weights that changed, for the bf16 weights and for the bf16 copy of the fp32 master that the bf16
forward pass would use, after the first step and after all steps.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def adamw_steps(weight, grad, steps, lr=2e-5):
    """weight (fp32 or bf16 tensor), grad (fp32) → [weight after each of `steps` AdamW steps, same dtype]."""
    weight = weight.detach().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=0.01, foreach=False)
    after = []
    for _ in range(steps):
        weight.grad = grad.to(weight.dtype)
        optimizer.step()
        after.append(weight.detach().clone())
    return after


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="AdamW steps per tensor (default 10)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of the same widths (a quick look)")
    args = parser.parse_args(argv)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from conftest import QWEN3_06B
    torch.manual_seed(0)
    config = Qwen3Config(**{**QWEN3_06B, **({"num_hidden_layers": 2} if args.tiny else {})})
    model = Qwen3ForCausalLM(config)
    tokens = torch.randint(0, 14582, (1, 256))
    start = time.perf_counter()
    model(input_ids=tokens, labels=tokens).loss.backward()
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters, gradients in "
          f"{time.perf_counter() - start:.0f} s")
    # counts[mode] = [changed after step 1, changed after all steps]; total = weights counted
    counts = {"pure bf16 weights": [0, 0], "fp32 master (its bf16 copy)": [0, 0], "fp32 master itself": [0, 0]}
    total = 0
    for name, parameter in model.named_parameters():
        weight, grad = parameter.detach(), parameter.grad
        if grad is None:
            continue
        total += weight.numel()
        start_bf16 = weight.bfloat16()
        pure = adamw_steps(start_bf16, grad, args.steps)
        master = adamw_steps(weight, grad, args.steps)
        for i, k in enumerate((0, args.steps - 1)):
            counts["pure bf16 weights"][i] += int((pure[k] != start_bf16).sum())
            counts["fp32 master (its bf16 copy)"][i] += int((master[k].bfloat16() != start_bf16).sum())
            counts["fp32 master itself"][i] += int((master[k] != weight).sum())
    print(f"\nfraction of {total / 1e6:.0f} M weights changed by AdamW at lr 2e-5")
    print(f"{'':32s}{'after 1 step':>14s}{f'after {args.steps} steps':>16s}")
    for mode, (first, last) in counts.items():
        print(f"{mode:32s}{first / total:>14.3f}{last / total:>16.3f}")


if __name__ == "__main__":
    main()
