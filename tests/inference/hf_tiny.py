"""A tiny random Hugging Face GPT-2 imported into megacore, for interop tests.

``write_hf_model`` saves a GPT-2 (2 layers unless asked, hidden 32) over the demo GPT-2 vocabulary
(examples/data, 6000 tokens) with its tokenizer (``tokenizer.json``,
``tokenizer_config.json``, optionally a ``chat_template`` in the config, as the
converter keeps it) in one directory, the way a downloaded model looks.
``load_megacore_model`` converts it with the checkpoint converter and loads it into a
``GPTModel`` on the current (one-rank) grid. ``initializer_range`` is large so that
next-token distributions are peaked and greedy choices are not near-ties that the
different op orders of the two implementations could flip.
"""

import json
import os
import shutil

import torch

from megacore.checkpointing import load_checkpoint
from megacore.checkpointing.conversion import GPTDescription, convert_checkpoint
from megacore.checkpointing.conversion import description_from_hf_config
from megacore.models.gpt import GPTModel, get_gpt_decoder_block_spec
from megacore.transformer import TransformerConfig
from tests.inference.tiny_model import MERGE_FILE, VOCAB_FILE

MAX_POSITIONS = 128

# ChatML, as Qwen-style instruct models carry it: loops, conditionals, a special token
# variable and the generation prompt.
CHATML = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_hf_model(directory: str, chat_template=None, seed: int = 0, layers: int = 2):
    """A tiny GPT-2 and its tokenizer in ``directory``; returns the transformers model."""
    import transformers
    os.makedirs(directory, exist_ok=True)
    source = os.path.join(directory, "_vocab")
    os.makedirs(source, exist_ok=True)
    shutil.copy(VOCAB_FILE, source)
    shutil.copy(MERGE_FILE, source)
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(source)
    tokenizer.save_pretrained(directory)
    shutil.rmtree(source)
    if chat_template is not None:
        path = os.path.join(directory, "tokenizer_config.json")
        config = json.load(open(path))
        config["chat_template"] = chat_template
        json.dump(config, open(path, "w"), indent=2)
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=len(tokenizer),
                                  n_positions=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, initializer_range=0.3,
                                  bos_token_id=tokenizer.eos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # HF leaves norms at 1 and biases at 0: perturb them
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    return model.eval()


def convert(hf_dir: str, save_dir: str, ckpt_format: str = "torch") -> None:
    convert_checkpoint(load_dir=hf_dir, save_dir=save_dir, saver="megacore",
                       ckpt_format=ckpt_format, progress=False)


def description(hf_dir: str) -> GPTDescription:
    return description_from_hf_config(json.load(open(os.path.join(hf_dir, "config.json"))))


def load_megacore_model(hf_dir: str, save_dir: str) -> GPTModel:
    """The converted model on the current one-rank grid (``parallel_state`` initialized)."""
    convert(hf_dir, save_dir)
    desc = description(hf_dir)
    config = TransformerConfig(**desc.transformer_config_kwargs(), hidden_dropout=0.0,
                               attention_dropout=0.0)
    model = GPTModel(config, get_gpt_decoder_block_spec(config), **desc.gpt_model_kwargs())
    load_checkpoint([model], None, None, load_dir=save_dir, no_load_rng=True,
                    no_load_optim=True)
    return model.eval()
