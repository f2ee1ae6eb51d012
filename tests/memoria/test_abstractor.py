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
