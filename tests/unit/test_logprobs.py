"""vocab_parallel_logprobs on one rank (tp_group=None) against float64 closed forms.

The multi-rank (vocab-sharded) behaviour is in tests/distributed/test_vocab_parallel_logprobs.py.
"""

import math
import zlib

import pytest
import torch

from sapo_megatron.actor.logprobs import default_chunk_size, vocab_parallel_logprobs


def _reference(logits, target, temperature):
    """float64 log_softmax(logits / T)[target] and entropy -(p * log p).sum(-1)."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _closed_form_grad(logits, target, temperature, grad_lp, grad_ent):
    """d/dlogits of sum(g_lp * logprobs + g_H * entropy), float64:
    (g_lp * (onehot - p) - g_H * p * (log p + H)) / T."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(target, logits.shape[-1]).double()
    d_lp = onehot - p
    d_ent = -p * (logp + entropy)
    return (grad_lp.double().unsqueeze(-1) * d_lp + grad_ent.double().unsqueeze(-1) * d_ent) / temperature


def _logits(shape, dtype, kind, gen):
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "normal":
        x = 3.0 * x
    elif kind == "spread":
        # Nearly one-hot distributions: exp of the raw logits overflows by hundreds of orders.
        x = 200.0 * x
    elif kind == "offset":
        # A large common offset with a non-trivial distribution on top: only max-subtraction survives.
        offset = 1e3 if dtype != torch.float64 else 1e6
        x = x + offset * torch.sign(torch.randn(shape[:-1], generator=gen, dtype=torch.float64)).unsqueeze(-1)
    return x.to(dtype)


@pytest.fixture
def one_thread():
    # Bit-equality across chunkings needs the same summation order per row; torch splits a single long
    # row over several threads (chunk of 1 row) but not a block of rows, so pin one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "spread", "offset"])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_values_and_gradients_match_float64_reference(dtype, kind, temperature):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}-{kind}-{temperature}".encode()))
    seq, batch, vocab = 7, 3, 61  # Megatron's [seq, batch, vocab/tp] layout
    logits = _logits((seq, batch, vocab), dtype, kind, gen).requires_grad_()
    target = torch.randint(0, vocab, (seq, batch), generator=gen)
    grad_lp = torch.randn(seq, batch, generator=gen, dtype=torch.float64)
    grad_ent = torch.randn(seq, batch, generator=gen, dtype=torch.float64)

    logprobs, entropy = vocab_parallel_logprobs(
        logits, target, temperature=temperature, with_entropy=True, chunk_size=4
    )
    assert logprobs.shape == entropy.shape == (seq, batch)
    assert logprobs.dtype == entropy.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ((logprobs.double() * grad_lp).sum() + (entropy.double() * grad_ent).sum()).backward()

    ref_lp, ref_ent = _reference(logits.detach(), target, temperature)
    ref_grad = _closed_form_grad(logits.detach(), target, temperature, grad_lp, grad_ent)
    # The error budget is a few ulps of the largest scaled logit (the inputs themselves are only that exact).
    eps = torch.finfo(dtype).eps
    magnitude = max(1.0, logits.detach().double().abs().max().item() / temperature)
    atol = 4 * eps * magnitude
    torch.testing.assert_close(logprobs.double(), ref_lp, rtol=0, atol=atol)
    torch.testing.assert_close(entropy.double(), ref_ent, rtol=0, atol=atol)
    torch.testing.assert_close(logits.grad.double(), ref_grad, rtol=0, atol=atol)
    assert logits.grad.dtype == dtype


def test_closed_form_reference_is_autograd_of_log_softmax():
    # Guards the test's own closed form: it must be the gradient torch's autograd gives.
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 11, generator=gen, dtype=torch.float64).requires_grad_()
    target = torch.randint(0, 11, (5,), generator=gen)
    g_lp, g_ent = torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    lp, ent = _reference(logits, target, 0.7)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    expected = _closed_form_grad(logits.detach(), target, 0.7, g_lp, g_ent)
    torch.testing.assert_close(logits.grad, expected, rtol=0, atol=1e-14)


def test_logprob_gradient_is_onehot_minus_softmax():
    # One token, vocab of 4, T = 2: d logp_t / d logits = (onehot - softmax(logits / 2)) / 2.
    logits = torch.tensor([[1.0, 3.0, -2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1])
    logprobs, entropy = vocab_parallel_logprobs(logits, target, temperature=2.0)
    assert entropy is None
    logprobs.sum().backward()
    p = torch.softmax(logits.detach() / 2.0, dim=-1)
    expected = (torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64) - p) / 2.0
    torch.testing.assert_close(logits.grad, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(logprobs, torch.log(p[:, 1]), rtol=0, atol=1e-15)


def test_uniform_logits_closed_form():
    # Equal logits over V ids: log-prob -log V, entropy log V, entropy gradient 0.
    vocab = 8
    logits = torch.full((3, vocab), 5.0, dtype=torch.float64, requires_grad=True)
    logprobs, entropy = vocab_parallel_logprobs(logits, torch.tensor([0, 3, 7]), with_entropy=True)
    log_v = torch.full((3,), math.log(vocab), dtype=torch.float64)
    torch.testing.assert_close(logprobs, -log_v, rtol=0, atol=1e-15)
    torch.testing.assert_close(entropy, log_v, rtol=0, atol=1e-15)
    entropy.sum().backward()
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits), rtol=0, atol=1e-15)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_gradcheck_float64(with_entropy):
    gen = torch.Generator().manual_seed(11)
    logits = (2 * torch.randn(4, 3, 9, generator=gen, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, 9, (4, 3), generator=gen)

    def fn(x):
        lp, ent = vocab_parallel_logprobs(x, target, temperature=0.7, with_entropy=with_entropy, chunk_size=5)
        return (lp, ent) if with_entropy else lp

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-9, rtol=1e-7)


def test_gradient_of_only_one_output():
    # with_entropy=True but the loss uses only one of the two outputs: the other gradient arrives as None.
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 13, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 13, (6,), generator=gen)
    zeros = torch.zeros(6, dtype=torch.float64)
    ones = torch.ones(6, dtype=torch.float64)
    for use_lp, g_lp, g_ent in ((True, ones, zeros), (False, zeros, ones)):
        x = logits.clone().requires_grad_()
        lp, ent = vocab_parallel_logprobs(x, target, with_entropy=True)
        (lp if use_lp else ent).sum().backward()
        torch.testing.assert_close(x.grad, _closed_form_grad(logits, target, 1.0, g_lp, g_ent), rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunking_does_not_change_results(one_thread, dtype):
    gen = torch.Generator().manual_seed(7)
    n, vocab = 11, 4099
    logits = (4 * torch.randn(n, vocab, generator=gen)).to(dtype)
    target = torch.randint(0, vocab, (n,), generator=gen)
    g_lp, g_ent = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    results = []
    for chunk_size in (1, 2, 3, 5, n, 4 * n, None):
        x = logits.clone().requires_grad_()
        lp, ent = vocab_parallel_logprobs(x, target, temperature=0.9, with_entropy=True, chunk_size=chunk_size)
        ((lp * g_lp.to(lp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum()).backward()
        results.append((lp, ent, x.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_bf16_is_computed_in_fp32(temperature):
    # bf16 logits give exactly the fp32 results of the upcast logits, and the gradient is the fp32
    # gradient rounded once to bf16.
    gen = torch.Generator().manual_seed(13)
    logits = (3 * torch.randn(2, 5, 97, generator=gen)).to(torch.bfloat16)
    target = torch.randint(0, 97, (2, 5), generator=gen)
    g_lp, g_ent = torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen)
    grads, outs = [], []
    for x in (logits.clone().requires_grad_(), logits.float().requires_grad_()):
        lp, ent = vocab_parallel_logprobs(x, target, temperature=temperature, with_entropy=True, chunk_size=3)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        grads.append(x.grad)
        outs.append((lp, ent))
    assert outs[0][0].dtype == torch.float32
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert grads[0].dtype == torch.bfloat16
    assert torch.equal(grads[0], grads[1].to(torch.bfloat16))


@pytest.mark.parametrize("with_entropy", [False, True])
def test_inplace_backward_reuses_logits_storage(with_entropy):
    gen = torch.Generator().manual_seed(17)
    base = torch.randn(4, 6, 33, generator=gen)
    target = torch.randint(0, 33, (4, 6), generator=gen)

    leaf = base.clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(leaf, target, with_entropy=with_entropy, temperature=1.3)
    (lp.sum() + (ent.sum() if with_entropy else 0)).backward()

    leaf2 = base.clone().requires_grad_()
    logits = leaf2 * 1.0  # an intermediate, like the output layer's output
    lp2, ent2 = vocab_parallel_logprobs(
        logits, target, with_entropy=with_entropy, temperature=1.3, inplace_backward=True
    )
    assert torch.equal(lp2, lp)
    (grad,) = torch.autograd.grad(lp2.sum() + (ent2.sum() if with_entropy else 0), logits)
    assert grad.data_ptr() == logits.data_ptr()
    assert torch.equal(grad, leaf.grad)
    assert torch.equal(logits.detach(), leaf.grad)  # the logits now hold their gradient


def test_inplace_backward_is_caught_when_another_op_saved_the_logits():
    logits = torch.randn(3, 10, requires_grad=True) * 1.0
    squares = (logits**2).sum()  # PowBackward keeps logits for its backward, which runs after ours
    lp, _ = vocab_parallel_logprobs(logits, torch.tensor([1, 2, 3]), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + squares).backward()


def test_saves_only_the_logits_and_per_token_vectors_for_backward():
    # Memory-lean by construction: nothing of size [tokens, vocab] is saved but the caller's logits.
    n, vocab = 12, 257
    logits = torch.randn(3, 4, vocab, requires_grad=True) * 1.0
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vocab_parallel_logprobs(logits, torch.randint(0, vocab, (3, 4)), with_entropy=True, temperature=0.8)
    big = [t for t in saved if t.numel() > n]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr() and big[0].numel() == logits.numel()
    assert len(saved) > 1


def test_forward_only_and_empty_inputs():
    gen = torch.Generator().manual_seed(19)
    logits = torch.randn(5, 21, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 21, (5,), generator=gen)
    with torch.no_grad():
        lp, ent = vocab_parallel_logprobs(logits, target, with_entropy=True)
    ref_lp, ref_ent = _reference(logits, target, 1.0)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-14)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-14)
    assert not lp.requires_grad

    lp, ent = vocab_parallel_logprobs(torch.empty(0, 3, 21), torch.empty(0, 3, dtype=torch.long), with_entropy=True)
    assert lp.shape == ent.shape == (0, 3)


def test_default_chunk_size():
    assert default_chunk_size(151936, "cpu") == (1 << 20) // 151936
    assert default_chunk_size(10, "cpu") == (1 << 20) // 10
    assert default_chunk_size(1 << 30, "cpu") == 1
    assert default_chunk_size(75968, "cuda") == (1 << 24) // 75968


@pytest.mark.parametrize(
    "logits, target, kwargs, message",
    [
        (torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), {}, "target shape"),
        (torch.randn(2, 5), torch.zeros(2, 1, dtype=torch.long), {}, "target shape"),
        (torch.randn(2, 5), torch.tensor([0, 5]), {}, r"\[0, 5\)"),
        (torch.randn(2, 5), torch.tensor([-1, 2]), {}, r"\[0, 5\)"),
        (torch.randn(2, 5), torch.tensor([0.0, 1.0]), {}, "integer tensor"),
        (torch.randn(2, 5), torch.tensor([True, False]), {}, "integer tensor"),
        (torch.randint(0, 9, (2, 5)), torch.tensor([0, 1]), {}, "floating-point"),
        (torch.randn(2, 0), torch.zeros(2, dtype=torch.long), {}, "non-empty last"),
        (torch.randn(2, 5), torch.tensor([0, 1]), {"temperature": 0.0}, "temperature"),
        (torch.randn(2, 5), torch.tensor([0, 1]), {"temperature": -1.0}, "temperature"),
        (torch.randn(2, 5), torch.tensor([0, 1]), {"temperature": float("nan")}, "temperature"),
        (torch.randn(2, 5), torch.tensor([0, 1]), {"temperature": float("inf")}, "temperature"),
        (torch.randn(2, 5), torch.tensor([0, 1]), {"temperature": torch.tensor(1.0)}, "temperature"),
        (torch.randn(2, 5), torch.tensor([0, 1]), {"chunk_size": 0}, "chunk_size"),
        (torch.randn(2, 5), torch.tensor([0, 1]), {"chunk_size": 1.5}, "chunk_size"),
        (torch.randn(2, 5, requires_grad=True), torch.tensor([0, 1]), {"inplace_backward": True}, "leaf"),
    ],
)
def test_bad_input_raises_value_error(logits, target, kwargs, message):
    with pytest.raises(ValueError, match=message):
        vocab_parallel_logprobs(logits, target, **kwargs)


def test_non_contiguous_logits():
    # GPTModel's [batch, seq, vocab/tp] transposed to Megatron's [seq, batch, vocab/tp] without a copy.
    gen = torch.Generator().manual_seed(23)
    base = torch.randn(3, 5, 17, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 17, (5, 3), generator=gen)
    x = base.clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(x.transpose(0, 1), target, with_entropy=True, temperature=0.9)
    (lp.sum() + ent.sum()).backward()
    ref_lp, ref_ent = _reference(base.transpose(0, 1), target, 0.9)
    ones = torch.ones(5, 3, dtype=torch.float64)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-14)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-14)
    ref_grad = _closed_form_grad(base.transpose(0, 1), target, 0.9, ones, ones).transpose(0, 1)
    torch.testing.assert_close(x.grad, ref_grad, rtol=0, atol=1e-14)
