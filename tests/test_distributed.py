"""DDP on 2 CPU processes (gloo): gathered-candidate losses give the single-process gradient, and
cached accumulation over 2 ranks trains the weights of one process with the whole batch."""
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from har_ref import distributed
from har_ref.train.losses import balanced_pos_weight, clip_loss, siglip_loss

WORLD, N, IN_DIM, DIM = 2, 8, 5, 3  # 8 pairs split 4 + 4
LABELS = torch.tensor([0, 1, 0, 2, 1, 1, 2, 0])  # positives inside each shard and across shards


class Towers(torch.nn.Module):
    """Two linear 'encoders' and the temperature (and SigLIP bias) the losses learn."""

    def __init__(self, with_bias: bool):
        super().__init__()
        torch.manual_seed(0)  # same initial weights on every rank, as after DDP's broadcast
        self.image = torch.nn.Linear(IN_DIM, DIM, dtype=torch.float64)
        self.text = torch.nn.Linear(IN_DIM, DIM, dtype=torch.float64)
        self.logit_scale = torch.nn.Parameter(torch.tensor(1.2, dtype=torch.float64))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-0.5, dtype=torch.float64)) if with_bias else None

    def forward(self, image_inputs, text_inputs):
        return self.image(image_inputs), self.text(text_inputs)


def full_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, IN_DIM, generator=g, dtype=torch.float64), torch.randn(N, IN_DIM, generator=g,
                                                                                    dtype=torch.float64)


CASES = {  # name: (loss family, labels, pos_weight)
    "clip-diagonal": ("clip", None, None),
    "clip-classes": ("clip", LABELS, None),
    "siglip-diagonal": ("siglip", None, None),
    "siglip-classes-weighted": ("siglip", LABELS, balanced_pos_weight(LABELS)),
}


def compute_loss(model, family, image, text, labels, pos_weight, gathered=None):
    if family == "clip":
        return clip_loss(image, text, model.logit_scale, labels, gathered)
    return siglip_loss(image, text, model.logit_scale, model.logit_bias, labels, pos_weight, gathered)


def worker(rank, port, out_dir):
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.setup_distributed()
    assert distributed.is_distributed() and distributed.world_size() == WORLD and distributed.rank() == rank
    assert distributed.is_main_process() == (rank == 0)
    image_inputs, text_inputs = full_batch()
    shard = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
    results = {}
    for name, (family, labels, pos_weight) in CASES.items():
        model = Towers(with_bias=family == "siglip")
        ddp = DistributedDataParallel(model)
        image, text = ddp(image_inputs[shard], text_inputs[shard])
        image.retain_grad(), text.retain_grad()
        local_labels = None if labels is None else labels[shard]
        # Local anchors vs all candidates: the other ranks' rows are gathered candidates (with gradient).
        others = (distributed.gather_from_other_ranks(image), distributed.gather_from_other_ranks(text),
                  None if labels is None else distributed.gather_from_other_ranks(local_labels))
        assert torch.equal(distributed.gather_with_grad(image).detach(),
                           torch.cat([model.image(image_inputs[:N // 2]), model.image(image_inputs[N // 2:])]).detach())
        loss = compute_loss(model, family, image, text, local_labels, pos_weight, others)
        loss.backward()  # DDP all-reduces (averages) the parameter gradients here
        results[name] = {"params": {k: p.grad.clone() for k, p in model.named_parameters()},
                         "image": image.grad.clone(), "text": text.grad.clone()}
    torch.save(results, out_dir / f"rank{rank}.pt")
    distributed.cleanup()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GRAD_TOL = 1e-12  # float64; measured max |DDP - single process| 1.8e-15


def test_two_process_gradients_equal_single_process_full_batch(tmp_path, monkeypatch, measured):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # gloo on CPU even where a GPU exists
    mp.spawn(worker, args=(free_port(), tmp_path), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    image_inputs, text_inputs = full_batch()
    worst = 0.0
    for name, (family, labels, pos_weight) in CASES.items():
        model = Towers(with_bias=family == "siglip")
        image, text = model(image_inputs, text_inputs)
        image.retain_grad(), text.retain_grad()
        compute_loss(model, family, image, text, labels, pos_weight).backward()
        for r, result in enumerate(ranks):
            for param_name, param in model.named_parameters():  # DDP-averaged == single process
                torch.testing.assert_close(result[name]["params"][param_name], param.grad, rtol=0, atol=GRAD_TOL,
                                           msg=lambda m: f"{name} rank {r} {param_name}: {m}")
                worst = max(worst, (result[name]["params"][param_name] - param.grad).abs().max().item())
            # Per rank the loss is a mean over N/W anchors, i.e. W * (its share of the full loss),
            # so an embedding's gradient is W times its single-process gradient (DDP then divides by W).
            shard = slice(r * N // WORLD, (r + 1) * N // WORLD)
            for key, grad in (("image", image.grad), ("text", text.grad)):
                torch.testing.assert_close(result[name][key], WORLD * grad[shard], rtol=0, atol=GRAD_TOL)
                worst = max(worst, (result[name][key] - WORLD * grad[shard]).abs().max().item())
    measured(f"[ddp] gathered-candidate losses, 2 ranks vs 1 process: max |gradient difference| {worst:.2e} (fp64)")


def test_single_process_helpers_are_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    device = distributed.setup_distributed()
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    assert device == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    x = torch.randn(4, 3, requires_grad=True)
    assert distributed.gather_with_grad(x) is x
    assert distributed.gather_from_other_ranks(x).shape == (0, 3)
    distributed.cleanup()  # no-op


# ---------------------------------------------------------------- cached accumulation under DDP, end to end

K, B, STEPS = 2, 4, 3  # 2 ranks x 2 micro-batches x 4 images per step vs one process x 16 images
ORDER = torch.randperm(60, generator=torch.Generator().manual_seed(3)).tolist()  # the synthetic set's 60 images


def double_setup(cfg, weights, data, out):
    """setup() (setup.py) with the model in float64, so the comparison is about the algorithm, not rounding."""
    import har_ref.train.setup as setup_module

    load_model = setup_module.load_model
    setup_module.load_model = lambda *args, **kwargs: load_model(*args, **kwargs).double()
    try:
        return setup_module.setup(cfg, weights, data, out, resume=False, overwrite=False)
    finally:
        setup_module.load_model = load_model


def micro_batch(run, indices):
    from har_ref.train.setup import reread_micro_batch

    batch = reread_micro_batch(run, 0, indices)
    return batch._replace(pixels=batch.pixels.double())


def cached_cfg(family, **overrides):
    from har_ref.train.config import TrainConfig

    base = dict(model=family, epochs=1, micro_batch=B, accum_steps=K, accum_mode="cached", xbm_size=4 * B,
                xbm_warmup_steps=1, lr=1e-3, warmup_steps=1, precision="fp32", workers=0, augment=False)
    return TrainConfig(**{**base, **overrides})


def cached_worker(rank, port, family, weights, data, out_dir):
    import os

    from har_ref.train import loop

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run, state = double_setup(cached_cfg(family), weights, data, out_dir / "run")
    for step in range(STEPS):  # rank r holds micro-batches 2r and 2r+1 of the step's 4
        rows = ORDER[step * WORLD * K * B:(step + 1) * WORLD * K * B]
        batches = [micro_batch(run, rows[(rank * K + k) * B:(rank * K + k + 1) * B]) for k in range(K)]
        loop.cached_step(run, state, batches)
        loop.optimizer_step(run, state)
    torch.save({"weights": run.model.state_dict(), "total_steps": run.total_steps},
               out_dir / f"cached-rank{rank}.pt")
    distributed.cleanup()


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_cached_two_ranks_equal_one_process_with_the_whole_batch(family, tiny_weights, tmp_path, monkeypatch,
                                                                  measured):
    """--accum-mode cached under DDP: 2 ranks x 2 micro-batches x 4 train the weights of one process
    with one batch of 16 (the independent step, the plain path), same-class positives and the memory
    included (16 rows, on from the second step), in float64: the DDP argument in loop.cached_step."""
    from har_ref.demo.synthetic import generate
    from har_ref.train import loop

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    data = tmp_path / "data"
    generate(data, train_per_class=4, test_per_class=2, image_size=32, seed=0)
    mp.spawn(cached_worker, args=(free_port(), family, tiny_weights[family], data, tmp_path), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"cached-rank{r}.pt", weights_only=True) for r in range(WORLD)]

    run, state = double_setup(cached_cfg(family, micro_batch=WORLD * K * B, accum_steps=1,
                                         accum_mode="independent"), tiny_weights[family], data, tmp_path / "one")
    assert run.total_steps == ranks[0]["total_steps"]  # the same schedule
    for step in range(STEPS):
        big = micro_batch(run, ORDER[step * WORLD * K * B:(step + 1) * WORLD * K * B])
        assert len(set(big.labels.tolist())) < len(big.labels)  # same-class positives in the batch
        loop.independent_micro_step(run, state, big, last_of_step=True)
        loop.optimizer_step(run, state)
    assert state.xbm.get() is not None  # the memory took part
    worst = 0.0
    for name, weight in run.model.state_dict().items():
        for r in range(WORLD):
            worst = max(worst, (ranks[r]["weights"][name] - weight).abs().max().item())
    measured(f"[ddp cached] {family}: max |2 ranks x 2 micro-batches - 1 process x 16| over all weights "
             f"after {STEPS} steps (fp64): {worst:.2e}")
    assert worst < 1e-12  # measured 4.4e-15 (CLIP), 2.8e-15 (SigLIP)
