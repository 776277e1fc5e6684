"""Imported chat templates: Jinja sources rendered as transformers renders them, their trained
tokens and stop ids, and a Hugging Face import that keeps the template."""

import json

import numpy as np
import pytest

from lmjax import generate
from lmjax.config import UserError
from lmjax.data import chat_jinja
from lmjax.data.chat_jinja import JinjaTemplate
from lmjax.data.chat_template import LmjaxTemplate, TemplateError
from lmjax.hf import export
from lmjax.hf import tokenizer as hf_tokenizer

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# LLaMA-2-chat's, as its tokenizer_config.json has it (spaces and all).
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
# lmjax's own template, written in Jinja.
LMJAX = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What does len do?"},
    {"role": "assistant", "content": "Counts items."},
    {"role": "user", "content": "And max?"},
    {"role": "assistant", "content": "The largest."},
]


@pytest.fixture(scope="module")
def tok(stdlib_corpus):
    return stdlib_corpus.tokenizer


def test_chatml_renders_as_written_and_trains_on_the_replies(tok):
    template = JinjaTemplate(tok, CHATML)
    rendered = template.render(CONVERSATION)
    turn = "<|im_start|>{}\n{}<|im_end|>\n".format
    expected = "".join(turn(m["role"], m["content"]) for m in CONVERSATION)
    assert rendered.ids == tok.encode(expected)
    trained = np.asarray(rendered.ids)[rendered.trained].tolist()
    assert trained == tok.encode("Counts items.<|im_end|>\n") + tok.encode("The largest.<|im_end|>\n")
    prompt = template.prompt(CONVERSATION[:2])
    asked = turn("system", "Be brief.") + turn("user", "What does len do?") + "<|im_start|>assistant\n"
    assert prompt == [tok.bos_id, *tok.encode(asked)]  # one <s>, which the template does not print
    assert template.stop_ids == (tok.eos_id,)  # <|im_end|> is no piece of this tokenizer


def test_llama2_takes_its_bos_and_eos_as_pieces(tok):
    template = JinjaTemplate(tok, LLAMA2)
    rendered = template.render(CONVERSATION)
    first = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat does len do? [/INST] Counts items. "
    expected = [
        *tok.encode(first),
        tok.eos_id,
        tok.bos_id,
        *tok.encode("[INST] And max? [/INST] The largest. "),
    ]
    assert rendered.ids == [*expected, tok.eos_id]  # the template's own first <s> is the sequence's
    trained = np.asarray(rendered.ids)[rendered.trained].tolist()
    assert trained == [*tok.encode(" Counts items. "), tok.eos_id, *tok.encode(" The largest. "), tok.eos_id]
    prompt = template.prompt(CONVERSATION[:2])
    assert prompt[0] == tok.bos_id and prompt[1] != tok.bos_id
    assert prompt == [tok.bos_id, *tok.encode(first.removesuffix(" Counts items. "))]
    assert template.stop_ids == (tok.eos_id,)


def test_lmjax_template_in_jinja_equals_lmjax_template(tok):
    """The same template written in Jinja gives the same ids, trained tokens, prompt and stops."""
    jinja, native = JinjaTemplate(tok, LMJAX), LmjaxTemplate(tok)
    a, b = jinja.render(CONVERSATION), native.render(CONVERSATION)
    assert a.ids == b.ids and a.trained.tolist() == b.trained.tolist()
    assert jinja.prompt(CONVERSATION[:4]) == native.prompt(CONVERSATION[:4])
    assert set(jinja.stop_ids) == set(native.stop_ids[:2])  # <|end|> is a piece: a stop id, as </s>


@pytest.mark.parametrize(
    "source, messages, problem",
    [
        (
            LLAMA2,
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "roles must alternate",
        ),
        (CHATML, [{"role": "user", "content": "see </s> here"}], "special piece </s>"),
        (CHATML, [{"role": "robot", "content": "a"}], "message 0 must be"),
        # Earlier turns that change with what follows: which tokens are the reply's is unknown.
        (
            "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}",
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            r"before message 1 \(an assistant turn\)",
        ),
    ],
    ids=["raise_exception", "special-text", "bad-role", "not-a-prefix"],
)
def test_a_conversation_the_template_refuses_is_one_user_error(tok, source, messages, problem):
    with pytest.raises(TemplateError, match=problem) as e:
        JinjaTemplate(tok, source).render(messages)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_invalid_jinja_is_a_user_error(tok):
    with pytest.raises(TemplateError, match=r"not valid Jinja \(line 1"):
        JinjaTemplate(tok, "{% for m in messages %}")


def test_chat_template_of_a_hugging_face_folder(tmp_path):
    assert hf_tokenizer.chat_template(tmp_path) is None
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}]}))
    with pytest.raises(UserError, match='none "default"'):
        hf_tokenizer.chat_template(tmp_path)
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config.write_text(json.dumps({"chat_template": named}))
    assert hf_tokenizer.chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")  # newer transformers: a file of its own
    assert hf_tokenizer.chat_template(tmp_path) == "J"


def test_import_keeps_the_chat_template(short_run, tmp_path):
    hf, run = tmp_path / "hf", tmp_path / "run"
    assert export.main(["--workdir", str(short_run), "--to", "hf", str(hf)]) == 0
    config = json.loads((hf / "tokenizer_config.json").read_text())
    # lmjax's own template in Jinja: ChatML's markers are too many tokens for this 32-token context.
    (hf / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LMJAX}))
    assert export.main(["--from-hf", str(hf), "--to", "lmjax", str(run)]) == 0
    assert (run / chat_jinja.JINJA_FILE).read_text() == LMJAX
    generator = generate.Generator.from_workdir(run)
    assert isinstance(generator.template, JinjaTemplate)
    replies = generator.chat([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    assert len(replies) == 1 and isinstance(replies[0], str) and generator.last_tokens >= 1
