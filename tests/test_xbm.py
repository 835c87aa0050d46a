"""Cross-batch memory: ring-buffer order, warm-up, no gradient into memory, call order, resume."""
import pytest
import torch
import torch.nn.functional as F

from har_ref.train.losses import clip_loss, positive_mask, siglip_loss
from har_ref.train.xbm import CrossBatchMemory
from test_losses import naive_clip_loss, naive_siglip_loss


pytestmark = pytest.mark.usefixtures("one_thread")


def rows(ids, dim=3):
    """Embeddings whose direction encodes the row id, so stored rows can be identified."""
    ids = torch.as_tensor(ids, dtype=torch.float32)
    return torch.stack([ids + 1, 2 * ids + 1, torch.full_like(ids, 3.0)], dim=1)[:, :dim]


def reference_ring(size, batches):
    """Row-by-row writes: the behaviour enqueue must reproduce."""
    slots, pointer = [None] * size, 0
    for batch in batches:
        for row_id in batch:
            slots[pointer] = row_id
            pointer = (pointer + 1) % size
    return slots, pointer


@pytest.mark.parametrize("batch_sizes", [[2, 2, 2], [4, 3], [3, 7], [5, 5, 1], [12]],
                         ids=["even", "wrap-mid-batch", "batch-longer-than-memory", "exact-fill",
                              "first-batch-too-long"])
def test_enqueue_matches_row_by_row_ring(batch_sizes):
    size = 5
    xbm = CrossBatchMemory(size, dim=3)
    batches, next_id = [], 0
    for n in batch_sizes:
        ids = list(range(next_id, next_id + n))
        next_id += n
        batches.append(ids)
        xbm.enqueue(rows(ids), rows(ids) * 2, torch.tensor(ids))
    slots, pointer = reference_ring(size, batches)
    filled = [s for s in slots if s is not None]
    memory = xbm.get()
    assert xbm.pointer == pointer and xbm.filled == len(filled)
    assert memory.labels.tolist() == filled  # in slot order
    torch.testing.assert_close(memory.image, F.normalize(rows(filled), dim=-1), rtol=0, atol=1e-7)
    torch.testing.assert_close(memory.text, F.normalize(rows(filled), dim=-1), rtol=0, atol=1e-7)


def test_memory_is_normalized_detached_and_in_given_dtype():
    xbm = CrossBatchMemory(8, dim=4, dtype=torch.float64)
    image = torch.randn(3, 4, requires_grad=True)
    xbm.enqueue(image * 5, torch.randn(3, 4, requires_grad=True), torch.tensor([0, 1, 2]))
    memory = xbm.get()
    assert memory.image.dtype == memory.text.dtype == torch.float64 and memory.labels.dtype == torch.long
    assert not memory.image.requires_grad and not memory.text.requires_grad
    torch.testing.assert_close(memory.image.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(memory.image, F.normalize(image.detach().double(), dim=-1), rtol=0, atol=1e-7)


def test_warmup_counts_enqueue_calls():
    xbm = CrossBatchMemory(10, dim=3, warmup_steps=2)
    assert xbm.get() is None
    xbm.enqueue(rows([0, 1]), rows([0, 1]), torch.tensor([0, 1]))
    assert xbm.get() is None  # 1 of 2 warm-up steps
    xbm.enqueue(rows([2]), rows([2]), torch.tensor([2]))
    assert xbm.get().labels.tolist() == [0, 1, 2]  # filled during warm-up, served after it
    assert CrossBatchMemory(10, dim=3, warmup_steps=0).get() is None  # empty memory is never served


def test_training_order_never_counts_a_batch_twice_and_leaves_memory_untouched():
    """get -> loss -> backward -> enqueue: at step t memory holds exactly batches < t."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 3, dtype=torch.float64)
    logit_scale = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    xbm = CrossBatchMemory(100, dim=3, dtype=torch.float64)
    seen = []
    for step in range(4):
        ids = torch.arange(3 * step, 3 * step + 3)  # unique ids stand in for labels
        image, text = encoder(torch.randn(3, 4, dtype=torch.float64)), encoder(torch.randn(3, 4, dtype=torch.float64))
        memory = xbm.get()
        if step == 0:
            assert memory is None
        else:
            assert memory.labels.tolist() == seen and not set(memory.labels.tolist()) & set(ids.tolist())
        snapshot = None if memory is None else [t.clone() for t in memory]
        loss = clip_loss(image, text, logit_scale, ids, memory=memory)
        loss.backward()
        assert encoder.weight.grad is not None and logit_scale.grad is not None
        if memory is not None:
            assert all(t.grad is None and not t.requires_grad for t in memory)
            assert all(torch.equal(a, b) for a, b in zip(memory, snapshot))
        xbm.enqueue(image, text, ids)
        seen += ids.tolist()


def test_enqueue_before_backward_is_an_error_not_a_silent_wrong_gradient():
    xbm = CrossBatchMemory(10, dim=3)
    xbm.enqueue(rows([0, 1]), rows([0, 1]), torch.tensor([0, 1]))
    image, text = rows([2, 3]).requires_grad_(), rows([4, 5]).requires_grad_()
    loss = clip_loss(image, text, torch.tensor(1.0), torch.tensor([2, 3]), memory=xbm.get())
    xbm.enqueue(image, text, torch.tensor([2, 3]))  # writes the buffers autograd saved
    with pytest.raises(RuntimeError, match="inplace operation"):
        loss.backward()


def test_losses_with_memory_equal_hand_concatenation():
    torch.manual_seed(1)
    xbm = CrossBatchMemory(6, dim=4, dtype=torch.float64)
    old = [(torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64), torch.tensor(l))
           for l in ([0, 1, 1, 2], [2, 0, 3, 1])]
    for image, text, labels in old:
        xbm.enqueue(image, text, labels)
    # Ring of 6 after 8 rows: slots 0-1 hold the last two rows of batch 2, slots 2-5 rows 2..5 overall.
    memory_image = torch.cat([old[1][0][2:], old[0][0][2:], old[1][0][:2]])
    memory_text = torch.cat([old[1][1][2:], old[0][1][2:], old[1][1][:2]])
    memory_labels = torch.cat([old[1][2][2:], old[0][2][2:], old[1][2][:2]])
    image, text, labels = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), \
        torch.tensor([1, 0, 1, 2, 3])
    scale, bias = torch.tensor(0.8, dtype=torch.float64), torch.tensor(-1.2, dtype=torch.float64)
    memory = xbm.get()
    assert torch.equal(memory.labels, memory_labels)
    by_hand = (memory_image, memory_text, memory_labels)
    torch.testing.assert_close(clip_loss(image, text, scale, labels, memory=memory),
                               naive_clip_loss(image, text, scale, labels, memory=by_hand),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(siglip_loss(image, text, scale, bias, labels, 2.0, memory=memory),
                               naive_siglip_loss(image, text, scale, bias, labels, 2.0, memory=by_hand),
                               rtol=1e-12, atol=1e-12)


def test_memory_larger_than_the_dataset_meets_stale_self_copies_as_positives():
    """A memory of 8 rows over a training set of 6 images (as the SigLIP preset's 32,000 rows over
    about 10,700 images): in the second epoch an anchor meets the first epoch's row of its own image,
    computed by the weights of then. It carries the anchor's class, so the loss counts it a positive,
    like every other row of the class; with labels=None it would be a negative (docs/losses.md, section 6)."""
    torch.manual_seed(0)
    images, texts = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    classes = torch.tensor([0, 0, 1, 1, 2, 2])
    encoder = torch.nn.Linear(4, 3, dtype=torch.float64)
    xbm = CrossBatchMemory(8, dim=3, dtype=torch.float64)
    with torch.no_grad():
        for batch in ([0, 3], [5, 1], [2, 4]):  # epoch 1, shuffled; the memory keeps all 6 rows
            xbm.enqueue(encoder(images[batch]), encoder(texts[batch]), classes[batch])
        stale = F.normalize(encoder(images[[3, 0]]), dim=-1)
        encoder.weight.add_(0.1 * torch.randn_like(encoder.weight))  # the optimizer steps in between
    anchors = [3, 0]  # epoch 2's first batch
    image, text = encoder(images[anchors]), encoder(texts[anchors])
    memory = xbm.get()
    assert xbm.filled == len(images)  # every image of the training set has a row in the memory
    self_copy = [1, 0]  # memory slots of images 3 and 0 (enqueue order 0, 3, 5, 1, 2, 4)
    for anchor, slot in enumerate(self_copy):
        torch.testing.assert_close(memory.image[slot], stale[anchor], rtol=0, atol=1e-12)  # its own image...
        assert not torch.allclose(memory.image[slot], F.normalize(image[anchor], dim=0), atol=1e-3)  # ...stale
    mask = positive_mask(classes[anchors], len(anchors), memory.labels, len(memory.labels))
    assert all(mask[anchor, len(anchors) + slot] for anchor, slot in enumerate(self_copy))
    assert mask[0, len(anchors):].tolist() == (memory.labels == 1).tolist()  # one positive among its class's
    assert not positive_mask(None, len(anchors), None, len(memory.labels))[:, len(anchors):].any()
    # The loss is the per-pair definition with those positives: nothing singles the self-copy out.
    scale = torch.tensor(1.1, dtype=torch.float64)
    torch.testing.assert_close(clip_loss(image, text, scale, classes[anchors], memory=memory),
                               naive_clip_loss(image, text, scale, classes[anchors], memory=tuple(memory)),
                               rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_resumes_identically(tmp_path):
    xbm = CrossBatchMemory(5, dim=3, warmup_steps=3)
    for ids in ([0, 1, 2], [3, 4], [5, 6]):
        xbm.enqueue(rows(ids), rows(ids), torch.tensor(ids))
    torch.save(xbm.state_dict(), tmp_path / "xbm.pt")
    resumed = CrossBatchMemory(5, dim=3, warmup_steps=3)
    resumed.load_state_dict(torch.load(tmp_path / "xbm.pt", weights_only=True))
    for memory in (xbm, resumed):  # the next step behaves the same in both
        memory.enqueue(rows([7, 8]), rows([7, 8]), torch.tensor([7, 8]))
    assert (resumed.pointer, resumed.filled, resumed.steps) == (xbm.pointer, xbm.filled, xbm.steps) == (4, 5, 4)
    for a, b in zip(xbm.get(), resumed.get()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="memory size"):
        CrossBatchMemory(6, dim=3).load_state_dict(xbm.state_dict())
