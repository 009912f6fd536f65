import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForSequenceClassification

from shared.flops import encoder_forward_flops, flops_per_token


def bert_base(**overrides) -> BertConfig:
    return BertConfig(num_labels=2, **overrides)  # BertConfig's defaults are bert-base


def bert_large() -> BertConfig:
    return BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, num_labels=2
    )


def measured_flops(model, seq_lens) -> int:
    """What FlopCounterMode sees: each sequence on its own (no padding), eager attention."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        for n in seq_lens:
            ids = torch.randint(5, model.config.vocab_size, (1, n))
            model(input_ids=ids)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    ("hidden", "layers", "heads", "ffn", "labels", "lens"),
    [(32, 2, 2, 64, 2, [7]), (48, 3, 4, 96, 3, [5, 17, 30]), (64, 1, 4, 256, 5, [1, 64])],
)
def test_matches_flop_counter_on_small_random_berts(hidden, layers, heads, ffn, labels, lens):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        num_labels=labels,
        max_position_embeddings=128,
    )
    model = BertForSequenceClassification(config).eval()
    model.set_attn_implementation("eager")
    expected = measured_flops(model, lens)
    assert encoder_forward_flops(config, lens) == pytest.approx(expected, rel=0.02)


def test_bert_base_at_128_tokens():
    assert encoder_forward_flops(bert_base(), [128]) / 1e9 == pytest.approx(22.3, abs=0.3)


def test_bert_large_is_about_three_and_a_half_times_base():
    ratio = encoder_forward_flops(bert_large(), [128]) / encoder_forward_flops(bert_base(), [128])
    assert 3.3 < ratio < 3.7


def test_partial_depth_and_head():
    config = bert_base()
    full = encoder_forward_flops(config, [64])
    half = encoder_forward_flops(config, [64], num_layers=6)
    head = encoder_forward_flops(config, [64], num_layers=12) - encoder_forward_flops(
        config, [64], num_layers=12, with_head=False
    )
    assert head == 2 * 768 * 768 + 2 * 768 * 2
    assert half * 2 + head == full
    assert encoder_forward_flops(config, [64], num_layers=0) == 0


def test_linear_in_sequences():
    config = bert_base()
    assert encoder_forward_flops(config, [10, 20]) == encoder_forward_flops(
        config, [10]
    ) + encoder_forward_flops(config, [20])
    assert encoder_forward_flops(config, []) == 0
    assert flops_per_token(config) > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_layers"):
        encoder_forward_flops(bert_base(), [8], num_layers=13)
    with pytest.raises(ValueError, match="seq_lens"):
        encoder_forward_flops(bert_base(), [-1])
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(bert_base(), 0)
