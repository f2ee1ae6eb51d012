"""The Hyperpartisan baselines: transformers' own classifiers behind the memory protocol (no memory, same logits as
the wrapped class, their document lengths, the save/load round trip)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BigBirdConfig,
    BigBirdForSequenceClassification,
    LongformerConfig,
    LongformerForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from experiment.models.long_document import (
    BertSegmentClassifier,
    BigBirdDocumentClassifier,
    LongformerDocumentClassifier,
    RobertaSegmentClassifier,
)

SHAPE = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
CASES = {
    "bert": (BertSegmentClassifier, BertForSequenceClassification, BertConfig(**SHAPE, max_position_embeddings=32),
             32, None),
    "roberta": (RobertaSegmentClassifier, RobertaForSequenceClassification,
                RobertaConfig(**SHAPE, max_position_embeddings=34, pad_token_id=1), 32, None),
    "longformer": (LongformerDocumentClassifier, LongformerForSequenceClassification,
                   LongformerConfig(**SHAPE, max_position_embeddings=130, attention_window=8, pad_token_id=1), 128,
                   128),
    "bigbird": (BigBirdDocumentClassifier, BigBirdForSequenceClassification,
                BigBirdConfig(**SHAPE, max_position_embeddings=128, block_size=4, num_random_blocks=2,
                              attention_type="block_sparse"), 128, 128),
}


@pytest.mark.parametrize("name", CASES)
def test_the_wrapper_is_the_transformers_model_with_no_memory(name, tmp_path):
    ours_class, theirs_class, config, max_length, document_tokens = CASES[name]
    torch.manual_seed(0)
    model = ours_class(config).eval()
    assert model.max_segment_length == max_length
    assert getattr(model, "document_tokens", None) == document_tokens
    model.save_pretrained(tmp_path)
    theirs = theirs_class.from_pretrained(tmp_path).eval()
    again = ours_class.from_pretrained(tmp_path).eval()
    T = min(max_length, 100)
    ids = torch.randint(3, 50, (2, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, T // 2:], mask[1, T // 2:] = config.pad_token_id, 0
    extra = {"global_attention_mask": (torch.arange(T) == 0).long().expand(2, T)} if name == "longformer" else {}
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        assert out.logits.shape == (2, 2) and float(out.aux_loss) == 0.0
        assert torch.equal(out.logits, theirs(ids, attention_mask=mask, **extra).logits)
        assert torch.equal(out.logits, again(ids, attention_mask=mask).logits)
        model.reset_memory()  # no state: the same call gives the same answer
        assert torch.equal(out.logits, model(ids, attention_mask=mask).logits)
    state = model.get_memory_state()
    model.set_memory_state(state)
    with pytest.raises(ValueError, match="kind"):
        model.set_memory_state({"memory_kind": "memoria_bert"})
