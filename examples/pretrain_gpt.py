#!/usr/bin/env python
"""Pretrain a GPT with Megatron-style flags (run under torchrun for several ranks).

    torchrun --nproc-per-node 4 examples/pretrain_gpt.py \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
        --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
        --max-position-embeddings 128 --micro-batch-size 4 --global-batch-size 16 \
        --lr 1e-3 --train-iters 200 --data-path my_text_document --split 98,2,0 \
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt

The model provider and the tokenizer come from the library
(:mod:`megacore.training.gpt_provider`); the dataset provider and the forward step below
are the functions Megatron users write. ``pretrain`` hands each the parsed run
configuration instead of a global ``args``.
"""

import functools
import sys

import torch
import torch.distributed as dist

from megacore import device, parallel_state
from megacore.datasets import (
    BlendedMegatronDatasetBuilder,
    parse_and_normalize_split,
    GPTDataset,
    GPTDatasetConfig,
    get_blend_from_list,
)
from megacore.training import pretrain
from megacore.training.cli import run_program
from megacore.training.gpt_provider import get_tokenizer, model_provider
from megacore.transformer import ModelType
from megacore.transformer.context_parallel import (
    get_batch_on_this_cp_rank,
    masked_token_mean_over_cp,
)


def _blend(paths):
    return get_blend_from_list(paths) if paths else None


def train_valid_test_datasets_provider(run, train_val_test_num_samples):
    """Build the train, validation and test GPT datasets."""
    d = run.data
    separate = d.train_data_path or d.valid_data_path or d.test_data_path
    config = GPTDatasetConfig(
        random_seed=run.training.seed, sequence_length=run.gpt.seq_length,
        blend=None if separate else _blend(d.data_path),
        blend_per_split=[_blend(d.train_data_path), _blend(d.valid_data_path),
                         _blend(d.test_data_path)] if separate else None,
        split=None if separate or d.mock_data else d.split,
        path_to_cache=d.data_cache_path, mock=d.mock_data, tokenizer=get_tokenizer(run),
        reset_position_ids=d.reset_position_ids, reset_attention_mask=d.reset_attention_mask,
        eod_mask_loss=d.eod_mask_loss, create_attention_mask=d.reset_attention_mask,
        mmap_bin_files=d.mmap_bin_files)
    sizes = list(train_val_test_num_samples)
    if separate:
        present = (d.train_data_path, d.valid_data_path, d.test_data_path)
    elif d.mock_data:
        present = (True, True, True)
    else:  # a split weighted 0 (e.g. --split 98,2,0) is not asked for samples
        present = [w > 0 for w in parse_and_normalize_split(d.split)]
    sizes = [n if p else 0 for n, p in zip(sizes, present)]
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def get_batch(data_iterator):
    """The micro-batch for this stage: tokens on the first stage, labels on the last."""
    if not (parallel_state.is_pipeline_first_stage() or parallel_state.is_pipeline_last_stage()):
        return None, None, None, None, None
    batch = {key: value.to(device.current_device(), non_blocking=True)
             if torch.is_tensor(value) else value for key, value in next(data_iterator).items()}
    # Context parallelism: keep this rank's two sequence chunks (load-balanced split).
    batch = get_batch_on_this_cp_rank(batch, parallel_state.get_context_parallel_world_size(),
                                      parallel_state.get_context_parallel_rank())
    return (batch["tokens"], batch["labels"], batch["loss_mask"], batch.get("attention_mask"),
            batch["position_ids"])


def per_token_loss_func(loss_mask, output_tensor):
    """``--calculate-per-token-loss`` (Megatron's semantics): the loss to differentiate is
    the *sum* over this rank's unmasked tokens, returned with their count; the schedule
    leaves it undivided and ``finalize_model_grads`` divides the summed gradients by the
    token count over micro-batches and dp x cp ranks. Reported: ``(sum, count)`` over
    dp x cp, which the training loop turns into a per-token mean over micro-batches."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.to(losses.dtype).reshape(-1)
    local_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int64)
    reported = torch.stack([local_sum.detach(), mask.sum()])  # [2], contiguous
    dist.all_reduce(reported, group=parallel_state.get_data_parallel_group(
        with_context_parallel=True))
    return local_sum, num_tokens, {"lm loss": (reported[0], reported[1])}


def loss_func(loss_mask, output_tensor, per_token=False, mtp_losses=()):
    """Mean loss over the micro-batch's unmasked tokens of the whole sequence (all cp ranks);
    the value averaged over data-parallel ranks is reported (with each multi-token
    prediction depth's loss, already part of the gradient, as ``mtp_<k> loss``)."""
    if per_token:
        return per_token_loss_func(loss_mask, output_tensor)
    loss, reported = masked_token_mean_over_cp(output_tensor.float(), loss_mask,
                                               parallel_state.get_context_parallel_group())
    values = torch.stack([reported.reshape(()), *[m.float().reshape(()) for m in mtp_losses]])
    dp_group = parallel_state.get_data_parallel_group()
    dist.all_reduce(values, group=dp_group)
    values /= dist.get_world_size(dp_group)
    report = {"lm loss": values[0]}
    report.update({f"mtp_{k} loss": v for k, v in enumerate(values[1:], start=1)})
    return loss, report


def _mtp_losses(model):
    mtp = getattr(getattr(model, "module", model), "mtp", None)
    return list(mtp.last_losses) if mtp is not None else []


def forward_step(data_iterator, model):
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator)
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels,
                          loss_mask=loss_mask)
    per_token = model.config.calculate_per_token_loss  # DDP and GPTModel both carry it
    return output_tensor, functools.partial(loss_func, loss_mask, per_token=per_token,
                                            mtp_losses=_mtp_losses(model))


def main(argv=None):
    return pretrain(train_valid_test_datasets_provider, model_provider,
                    ModelType.encoder_or_decoder, forward_step, argv=argv)


if __name__ == "__main__":
    sys.exit(run_program(main))
