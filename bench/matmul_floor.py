"""The floor under any loss + backward at Qwen3's vocabulary: the three lm_head matmuls alone.

For chunks of R rows: logits = h @ W.T, grad_h = g @ W, grad_W += g.T @ h, with H = 1,024 and
V = 151,936 in fp32 on one thread, reported in GFLOP/s. At a rate r, N tokens need
3 * 2 * N * H * V / r seconds whatever the loss does.

    python bench/matmul_floor.py
"""

import time

import torch


def timed(fn, repeats: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    torch.set_num_threads(1)
    vocab, hidden = 151_936, 1024
    weight = torch.randn(vocab, hidden)
    grad_weight = torch.zeros(vocab, hidden)
    for rows in (110, 220, 440, 1024):
        h, g = torch.randn(rows, hidden), torch.randn(rows, vocab)
        logits, grad_h = torch.empty(rows, vocab), torch.empty(rows, hidden)
        gflop = 2 * rows * hidden * vocab / 1e9
        rates = {"logits": gflop / timed(lambda: torch.mm(h, weight.T, out=logits)),
                 "grad_hidden": gflop / timed(lambda: torch.mm(g, weight, out=grad_h)),
                 "grad_weight": gflop / timed(lambda: grad_weight.addmm_(g.T, h))}
        seconds_4096 = sum(2 * 4096 * hidden * vocab / 1e9 / r for r in rates.values())
        print({"rows": rows, **{k: round(v, 1) for k, v in rates.items()},
               "three_matmuls_at_4096_tokens_s": round(seconds_4096, 1)}, flush=True)


if __name__ == "__main__":
    main()
