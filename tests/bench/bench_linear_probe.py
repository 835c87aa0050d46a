"""The linear probe's solver at the size of a real probe: the C grid on 1,600 embeddings (400 held out for
validation) and the refit on all 2,000, D = 768, 15 classes.

A benchmark, not a test: it prints each C's L-BFGS iterations and validation score, the wall time
and the process's CPU time.
The embeddings are synthetic, shaped like real ones: a power-law spectrum (variance of direction j
~ 1/j), a large component shared by every image (the "cone" of contrastive embeddings), Gaussian
clusters that overlap, L2-normalized. Separable on train at large C, as real probes are at D = 768.

    python tests/bench/bench_linear_probe.py [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from har_ref.eval.linear_probe import ProbeData, choose_C, fit_probe


def embeddings(n: int = 2000, classes: int = 15, dim: int = 768, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    spectrum = (1 + np.arange(dim)) ** -0.5
    spectrum /= np.linalg.norm(spectrum)
    centres = rng.normal(size=(classes, dim)) * spectrum
    shared = 3 * rng.normal(size=dim) * spectrum
    y = rng.integers(0, classes, n)
    x = centres[y] + shared + 6 * rng.normal(size=(n, dim)) * spectrum
    return torch.tensor(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=torch.float32), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = embeddings()
    names = [str(k) for k in range(15)]
    start, cpu_start = time.perf_counter(), time.process_time()
    best, records, solutions = choose_C(ProbeData.of(x[:1600], y[:1600], 15), x[1600:], y[1600:], names)
    grid_done = time.perf_counter()
    _, _, refit = fit_probe(ProbeData.of(x, y, 15), best["C"], solutions[best["C"]])
    done, cpu = time.perf_counter(), time.process_time() - cpu_start
    for r in records:
        print(f"C {r['C']:9.3g}  iterations {r['iterations']:4d}  max|grad f| {r['max_abs_grad']:.1e}  "
              f"validation macro-F1 {r['val_macro_f1']:.4f}  cross-entropy {r['val_cross_entropy']:.4f}")
    print(f"chosen C {best['C']:.4g}; refit on 2000: {refit['iterations']} iterations, max|grad f| "
          f"{refit['max_abs_grad']:.1e}")
    # on a busy machine the CPU time of a 1-thread run is what the wall time would be on an idle core
    print(f"threads {args.threads}: grid {grid_done - start:.2f} s + refit {done - grid_done:.2f} s "
          f"= {done - start:.2f} s wall, {cpu:.2f} s CPU")


if __name__ == "__main__":
    main()
