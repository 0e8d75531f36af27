"""GPTModel + DDP + distributed optimizer: checkpoints saved at tp=2 x pp=2 load at
tp=1 x pp=1 and at pp=2 x dp=2 (torch_dist), and round-trip in both formats.

The model is Llama-style with one key/value group (replicated key/value rows at tp=2,
saved in the logical layout), RoPE, tied embeddings (a copy on the last stage) and a
vocabulary padded differently at tp=1 (51) and tp=2 (52). Each loading layout compares
with its own reference built from the same seed and stepped the same way
(``toy_model.fake_step``: elementwise grads, so every layout steps the same global math;
tolerance in ``toy_model.assert_states_equal``).
"""

import pytest

from megacore import parallel_state as ps
from megacore.checkpointing import load_checkpoint, save_checkpoint
from megacore.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megacore.models.gpt import GPTModel, get_llama_layer_local_spec, llama_config_kwargs
from megacore.tensor_parallel import model_parallel_manual_seed
from megacore.transformer import TransformerConfig
from tests.checkpointing import toy_model as toy
from tests.multirank import run_distributed

VOCAB = 51


def _gpt(tp, pp, seed, mtp=None, tied=True):
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tp, pp)
    cfg = llama_config_kwargs(num_query_groups=1)
    cfg.update(num_layers=4, hidden_size=16, num_attention_heads=4, ffn_hidden_size=32,
               hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp,
               pipeline_model_parallel_size=pp, mtp_num_layers=mtp)
    config = TransformerConfig(**cfg)
    model_parallel_manual_seed(seed)
    model = GPTModel(config, get_llama_layer_local_spec(), VOCAB, max_sequence_length=16,
                     pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=tied,
                     position_embedding_type="rope")
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        use_distributed_optimizer=True), model)
    chunks = [ddp]
    opt, sched = toy.build_optimizer(chunks, distributed=True)
    return chunks, opt, sched


def _reference(tp, pp, **kw):
    chunks, opt, sched = _gpt(tp, pp, 1234, **kw)
    toy.fake_step(chunks, opt, sched)
    return chunks, opt, sched


def _save_tp2_pp2(root, **kw):
    chunks, opt, sched = _reference(2, 2, **kw)
    expected = toy.flat_state(chunks, opt, sched)
    counts = []
    for fmt in ("torch", "torch_dist"):
        save_checkpoint(3, chunks, opt, sched, save_dir=f"{root}/{fmt}", ckpt_format=fmt,
                        consumed_train_samples=12, config_dict={"vocab": VOCAB})
        fresh, opt2, sched2 = _gpt(2, 2, 99, **kw)
        assert load_checkpoint(fresh, opt2, sched2, load_dir=f"{root}/{fmt}")[:2] == (3, 12)
        counts.append(toy.assert_states_equal(toy.flat_state(fresh, opt2, sched2), expected))
    return counts


def _load_into(root, tp, pp, **kw):
    chunks, opt, sched = _reference(tp, pp, **kw)
    expected = toy.flat_state(chunks, opt, sched)
    fresh, opt2, sched2 = _gpt(tp, pp, 99, **kw)
    assert load_checkpoint(fresh, opt2, sched2, load_dir=f"{root}/torch_dist")[:2] == (3, 12)
    return toy.assert_states_equal(toy.flat_state(fresh, opt2, sched2), expected, exact=False)


def test_gpt_distributed_optimizer_checkpoint_reshards(tmp_path):
    counts = run_distributed(_save_tp2_pp2, 4, args=(str(tmp_path),))
    assert min(min(c) for c in counts) > 10
    assert run_distributed(_load_into, 1, args=(str(tmp_path), 1, 1))[0] > 30
    assert min(run_distributed(_load_into, 4, args=(str(tmp_path), 1, 2))) > 10


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_mtp_checkpoint_saves_the_last_stage_embedding_copy_once(tmp_path, tied):
    """Multi-token prediction at pp=2: the last stage's copy of the word embedding is one
    logical tensor with stage 0's (saved once, loaded into both copies), so the checkpoint
    reshards to a single process holding one table."""
    kw = dict(mtp=1, tied=tied)
    counts = run_distributed(_save_tp2_pp2, 4, args=(str(tmp_path),), kwargs=kw)
    assert min(min(c) for c in counts) > 10
    keys = _saved_model_keys(tmp_path / "torch_dist")
    assert [k for k in keys if "word_embeddings" in k] == \
        ["model/embedding.word_embeddings.weight"]
    assert ("model/output_layer.weight" in keys) == (not tied)
    assert any(k.startswith("model/mtp.layers.0.") for k in keys)
    assert run_distributed(_load_into, 1, args=(str(tmp_path), 1, 1), kwargs=kw)[0] > 30
    assert min(run_distributed(_load_into, 4, args=(str(tmp_path), 1, 2), kwargs=kw)) > 10


def _saved_model_keys(root):
    from torch.distributed.checkpoint import FileSystemReader

    [metadata] = [p.parent for p in root.rglob(".metadata")]
    keys = FileSystemReader(str(metadata)).read_metadata().state_dict_metadata
    return sorted(k for k in keys if k.startswith("model/"))
