import pytest
import torch

from memoria import Abstractor


def test_shapes_and_reference_parameter_names():
    a = Abstractor(num_memories=4, hidden_dim=8, feedforward_dim=16)
    out = a(torch.randn(3, 5, 8))
    assert out.shape == (3, 4, 8)
    assert [k for k, _ in a.named_parameters()] == [
        "query_embeddings", "key_transform.weight", "key_transform.bias", "value_transform.weight",
        "value_transform.bias", "feedforward.weight", "feedforward.bias", "output.weight", "output.bias",
    ]


def test_single_unscaled_head_and_affine_output():
    torch.manual_seed(0)
    a = Abstractor(2, 4, 6)
    x = torch.randn(1, 3, 4)
    k, v = a.key_transform(x), a.value_transform(x)
    attn = torch.softmax(a.query_embeddings @ k.transpose(1, 2), -1)  # no 1/sqrt(H)
    expect = a.output(a.feedforward(attn @ v))  # nothing between the two linears
    assert torch.allclose(a(x), expect, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_forward_and_gradients_equal_projecting_every_token(masked):
    """The forward projects the queries through the key weight and the pooled states through the value weight;
    output and every parameter's gradient equal the paper's form (keys and values of every token), biases
    included."""
    torch.manual_seed(0)
    a = Abstractor(3, 8, 16)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5]) if masked else None

    def paper_form():
        scores = a.query_embeddings @ a.key_transform(x).transpose(1, 2)  # (B, Nm, T)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], torch.finfo(scores.dtype).min)
        return a.output(a.feedforward(scores.softmax(-1) @ a.value_transform(x)))

    results = []
    for fn in (lambda: a(x, key_padding_mask=mask), paper_form):
        out = fn()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in a.parameters()])
        a.zero_grad(set_to_none=True)
    assert len(results[0]) == 1 + 9  # every parameter has a gradient (the key bias's is zero: softmax shift)
    for got, expect in zip(*results):
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-4)


def test_padding_mask_option_ignores_padded_tokens():
    torch.manual_seed(0)
    a = Abstractor(2, 4, 6)
    x = torch.randn(1, 5, 4)
    mask = torch.tensor([[True, True, True, False, False]])
    assert torch.allclose(a(x, key_padding_mask=mask), a(x[:, :3]), atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_memories"):
        Abstractor(0, 4, 4)
    with pytest.raises(ValueError, match="expects"):
        Abstractor(2, 4, 4)(torch.randn(2, 4))


def test_output_keeps_the_autocast_dtype():
    """The output layer's bias, added after its product, follows the product's dtype: under autocast the engrams
    come out in the autocast dtype as from a Linear with its bias."""
    torch.manual_seed(0)
    a = Abstractor(3, 8, 16)
    x = torch.randn(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = a(x)
        expect = a.output(a.feedforward(a.value_transform(torch.zeros(2, 3, 8))))  # a Linear's dtype under autocast
    assert out.dtype == expect.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), a(x), atol=3e-2, rtol=3e-2)
