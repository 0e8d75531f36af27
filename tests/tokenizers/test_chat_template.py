"""``HuggingFaceTokenizer``'s chat template renders as ``transformers``' does."""

import json

import pytest

from megacore.tokenizers import HuggingFaceTokenizer

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
            "{{ raise_exception('system must come first') }}{% endif %}"
            "<{{ m['role'] }}> {{ m['content'] }} {{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def _save(directory, template):
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "hi", "be", "brief"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                eos_token="</s>")
    fast.chat_template = template
    fast.save_pretrained(directory)
    return fast


def test_chat_template_renders_like_transformers(tmp_path):
    fast = _save(tmp_path, TEMPLATE)
    ours = HuggingFaceTokenizer(str(tmp_path))
    for generation_prompt in (True, False):
        assert ours.apply_chat_template(MESSAGES, generation_prompt) == \
            fast.apply_chat_template(MESSAGES, add_generation_prompt=generation_prompt,
                                     tokenize=False)
    with pytest.raises(ValueError, match="chat template refused the messages: system must come first"):
        ours.apply_chat_template(MESSAGES[::-1])


def test_named_templates_and_no_template(tmp_path):
    _save(tmp_path, None)
    ours = HuggingFaceTokenizer(str(tmp_path))
    assert ours.chat_template is None
    with pytest.raises(ValueError, match="has no chat template"):
        ours.apply_chat_template(MESSAGES)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"},
                               {"name": "default", "template": "{{ messages[0]['content'] }}"}]
    config_path.write_text(json.dumps(config))
    assert HuggingFaceTokenizer(str(tmp_path)).apply_chat_template(MESSAGES) == "be brief"
