"""Multi-token prediction: the returned loss is the main model's, the attached gradient is
exactly ``factor / depths`` times the gradient of the depths' losses written out from the
DeepSeek-V3 formula, and unsupported layouts are refused by name."""

import pytest
import torch

from megacore.models.gpt import GPTModel, get_gpt_decoder_block_spec
from megacore.tensor_parallel import model_parallel_manual_seed
from megacore.transformer import TransformerConfig
from megacore.transformer.multi_token_prediction import roll_left
from tests.inference.tiny_model import destroy_single_process, init_single_process

VOCAB, SEQ, BATCH = 40, 10, 3


def _model(mtp_layers, factor=0.3):
    config = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2,
                               hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.1,
                               mtp_num_layers=mtp_layers, mtp_loss_scaling_factor=factor)
    model_parallel_manual_seed(3)
    return GPTModel(config, get_gpt_decoder_block_spec(config), vocab_size=VOCAB,
                    max_sequence_length=SEQ, position_embedding_type="rope")


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _written_out_mtp_loss(model, ids, labels, mask):
    """sum_k loss_k from the formula, through the model's modules (Megatron's concat order:
    the normalized embedding of the shifted tokens, then the normalized hidden states)."""
    rotary = model.rotary_pos_emb(SEQ)
    h = model.decoder(model.embedding(ids, None), None, rotary_pos_emb=rotary)
    total = 0.0
    for k, layer in enumerate(model.mtp.layers, start=1):
        shifted = torch.cat([ids[:, k:], torch.zeros(BATCH, k, dtype=ids.dtype)], dim=1)
        e = model.embedding(shifted, None)
        x, _ = layer.eh_proj(torch.cat([layer.enorm(e), layer.hnorm(h)], dim=-1))
        h = layer.final_layernorm(layer.transformer_layer(x, None, rotary_pos_emb=rotary)[0])
        logits, _ = model.output_layer(h)  # [s, b, V]
        target = torch.cat([labels[:, k:], torch.zeros(BATCH, k, dtype=labels.dtype)], dim=1)
        ce = torch.nn.functional.cross_entropy(logits.transpose(0, 1).reshape(-1, VOCAB),
                                               target.reshape(-1), reduction="none")
        mask_k = torch.cat([mask[:, k:], torch.zeros(BATCH, k)], dim=1).reshape(-1)
        total = total + (ce * mask_k).sum() / mask_k.sum()
    return total


def test_mtp_gradient_is_the_written_out_objective():
    init_single_process()
    try:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        mask = (torch.rand(BATCH, SEQ, generator=g) > 0.2).float()

        model = _model(2)
        assert model.mtp.aux_loss_scale == 1.0  # set per step by training (loss scale / mb)
        loss = model(ids, None, None, labels=labels, loss_mask=mask)
        plain = _model(2)
        plain.mtp.eval()  # the same weights; MTP not attached to the graph
        expected_loss = plain(ids, None, None, labels=labels, loss_mask=mask)
        torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)  # value unchanged
        (loss * mask).sum().backward()
        attached = _grads(model)

        reference = _model(2)
        reference.mtp.eval()  # nothing attached: the objective is written out below
        main = reference(ids, None, None, labels=labels)
        objective = (main * mask).sum() + 0.3 / 2 * _written_out_mtp_loss(reference, ids,
                                                                          labels, mask)
        objective.backward()
        expected = _grads(reference)
        assert attached.keys() == expected.keys()
        assert any(name.startswith("mtp.") for name in attached)
        for name in expected:
            # Same math, summed in another order: float32 rounding of O(1-10) grads.
            torch.testing.assert_close(attached[name], expected[name], rtol=1e-5, atol=1e-5,
                                       msg=name)
        logged = [float(v) for v in model.mtp.last_losses]
        assert len(logged) == 2 and all(v > 0 for v in logged)
    finally:
        destroy_single_process()


def test_roll_left():
    t = torch.arange(8).view(2, 4)
    assert roll_left(t, 1, -1).tolist() == [[1, 2, 3, -1], [5, 6, 7, -1]]


def test_mtp_config_error():
    with pytest.raises(ValueError, match="mtp_num_layers must be None or >= 1"):
        TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, mtp_num_layers=0)


def test_a_last_stage_with_mtp_holds_its_own_embedding():
    """Without the first stage's layers the MTP stage still embeds the shifted tokens; tied,
    its output layer reads that table (no weight of its own), as in Megatron-Core."""
    init_single_process()
    try:
        config = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2,
                                   mtp_num_layers=1)
        model = GPTModel(config, get_gpt_decoder_block_spec(config), vocab_size=VOCAB,
                         max_sequence_length=SEQ, pre_process=False,
                         share_embeddings_and_output_weights=True,
                         position_embedding_type="rope")
        assert model.mtp_process and model.output_layer.weight is None
        assert model.shared_embedding_or_output_weight() is \
            model.embedding.word_embeddings.weight
    finally:
        destroy_single_process()
