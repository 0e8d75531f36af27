"""``normal_fill_``: the parallel normal init behind ``init_method_normal``.

The values must depend only on the seed and the tensor size (not on the number of
threads, which differs between machines and ranks), follow ``torch.manual_seed``, and be
N(0, sigma^2) across chunk boundaries.
"""

import torch

from megacore.transformer.initialization import _CHUNK, init_method_normal, normal_fill_


def _draw(threads, n, seed=3):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        return normal_fill_(torch.empty(n), 0.0, 0.02)
    finally:
        torch.set_num_threads(saved)


def test_values_do_not_depend_on_thread_count_and_follow_the_seed():
    n = _CHUNK + 1000  # two chunks, the last one partial
    one, two = _draw(1, n), _draw(2, n)
    assert torch.equal(one, two)
    assert not torch.equal(one, _draw(1, n, seed=4))
    # Each chunk has its own stream: no chunk repeats another's values.
    assert not torch.equal(one[:1000], one[_CHUNK:_CHUNK + 1000])
    assert abs(one.mean().item()) < 1e-4 and abs(one.std().item() - 0.02) < 1e-4
    # A non-contiguous tensor gets the values of a contiguous one of its size.
    torch.manual_seed(3)
    strided = normal_fill_(torch.empty(n, 2).t(), 0.0, 0.02)
    assert torch.equal(strided.contiguous().view(-1), _draw(1, 2 * n))
    # Up to one chunk: exactly torch's normal_ (small models keep their old values).
    small = _draw(2, 1000)
    torch.manual_seed(3)
    assert torch.equal(small, torch.empty(1000).normal_(0.0, 0.02))


def test_init_method_normal_uses_it():
    torch.manual_seed(5)
    a = init_method_normal(0.5)(torch.empty(100))
    torch.manual_seed(5)
    assert torch.equal(a, normal_fill_(torch.empty(100), 0.0, 0.5))
