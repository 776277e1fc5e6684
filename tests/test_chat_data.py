"""Conversations as data: the chat template, the chat sources, the trained-token mask in the
token cache and the batches, and supervised fine-tuning from a base run."""

import json
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import metrics_of, tiny_experiment, tiny_train_argv
from flax import nnx

from lmjax import config, loss, model, storage
from lmjax.config import UserError
from lmjax.data import cache, chat_template, loader
from lmjax.data.__main__ import main as data_main
from lmjax.data.cache_meta import corpus_identity
from lmjax.data.tokenizer import CHAT_PIECES
from lmjax.train import main

SYSTEM = {"role": "system", "content": "Answer with a number."}


def conversation(i: int) -> list[dict]:
    """A question about `i`, answered; every third has a system message and a second turn."""
    messages = [
        {"role": "user", "content": f"What is {i} times 7?"},
        {"role": "assistant", "content": f"{i * 7}."},
    ]
    if i % 3 == 0:
        messages = [SYSTEM, *messages, {"role": "user", "content": "And twice that?"}]
        messages.append({"role": "assistant", "content": f"{i * 14}."})
    return messages


def write_jsonl(path, conversations, field="messages"):
    path.write_text("".join(json.dumps({field: m, "id": k}) + "\n" for k, m in enumerate(conversations)))
    return path


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    write_jsonl(folder / "a.jsonl", [conversation(i) for i in range(200)])
    return folder


@pytest.fixture(scope="module")
def template(stdlib_corpus) -> chat_template.LmjaxTemplate:
    return chat_template.LmjaxTemplate(stdlib_corpus.tokenizer)


def test_lmjax_tokenizers_reserve_the_chat_pieces(stdlib_corpus):
    tok = stdlib_corpus.tokenizer
    assert [tok.piece_id(p) for p in CHAT_PIECES] == [4, 5, 6, 7]
    assert tok.piece_id("<|nothing|>") is None
    assert [tok.encode(p) for p in CHAT_PIECES] == [[4], [5], [6], [7]]


def test_rendering_round_trips_through_the_tokenizer(template):
    """The ids are what the tokenizer gives for the rendered text, and parse gives the messages
    back, on fuzzed contents (spaces, newlines, multi-byte characters, unknown ones)."""
    rng = random.Random(0)
    alphabet = list("ab c\n\t  é€😀<>|_=()x1") + ["def ", "    ", "<|", "|>", "<s"]
    checked = 0
    for _ in range(400):
        messages = [
            {"role": role, "content": "".join(rng.choice(alphabet) for _ in range(rng.randrange(30)))}
            for role in rng.choice([("user", "assistant"), ("system", "user"), ("user", "assistant", "user")])
        ]
        rendered = template.render(messages)
        assert template.tokenizer.encode(chat_template.text(messages)) == rendered.ids
        assert template.parse(rendered.ids) == messages
        checked += 1
    assert checked > 300


def test_only_the_assistant_turns_and_their_end_are_trained(template):
    messages = conversation(3)
    rendered = template.render(messages)
    tok = template.tokenizer
    trained = tok.decode([i for i, t in zip(rendered.ids, rendered.trained, strict=True) if t])
    assert trained == "21.<|end|>42.<|end|>"
    prompt = template.prompt(messages[:2])
    assert prompt[0] == tok.bos_id and prompt[-1] == tok.piece_id("<|assistant|>")
    assert template.stop_ids == (7, tok.eos_id, 4, 5, 6)  # <|end|>, </s>, and a new turn's role


@pytest.mark.parametrize(
    "messages, expected",
    [
        ([], "non-empty list"),
        ([{"role": "robot", "content": "hi"}], "message 0 must be"),
        ([{"role": "user", "content": 3}], "message 0 must be"),
        ([{"role": "user", "content": "hi"}, SYSTEM], "message 1 is a system message"),
        ([{"role": "user", "content": "a <|end|> b"}], "holds a template piece"),
    ],
)
def test_bad_conversations_are_refused(template, messages, expected):
    with pytest.raises(chat_template.TemplateError, match=expected):
        template.render(messages)


def test_fit_drops_the_oldest_turns_after_the_system_message(template):
    messages = [SYSTEM, *[m for i in range(6) for m in conversation(3 * i + 1)]]
    budget = len(template.prompt(messages)) - 1
    kept, dropped = chat_template.fit(template, messages, budget)
    assert kept[0] == SYSTEM and kept[1:] == messages[1 + dropped :] and dropped >= 2
    assert kept[1]["role"] == "user"  # never a reply without its question
    assert len(template.prompt(kept)) <= budget
    with pytest.raises(chat_template.TemplateError, match="shorten it"):
        chat_template.fit(template, [{"role": "user", "content": "x " * 400}], 32)


@pytest.fixture(scope="module")
def chat_data(stdlib_corpus):
    """data settings for conversations in `path`, with the stdlib corpus's tokenizer (as a
    fine-tuned model keeps its base model's)."""

    def make(path, **fields) -> config.Data:
        tokenizer_path = str(stdlib_corpus.entry / "tokenizer.model")
        return config.Data(
            source="chat", path=str(path), tokenizer_path=tokenizer_path, validation_percent=10, **fields
        )

    return make


def test_the_cache_keeps_the_trained_tokens_beside_the_tokens(chat_data, chat_folder):
    corpus = cache.load_or_build(chat_data(chat_folder), log=lambda m: None)
    tok = corpus.tokenizer
    train = corpus.splits("train")[0]
    assert (corpus.entry / "c0" / "train-trained.npy").is_file()
    summary = corpus.meta["parts"][0]["train"]
    assert summary["trained_tokens"] == int((train.trained[1::2] - train.trained[::2]).sum())
    # The identity a resumed run compares covers the trained ranges: another mask, another run.
    splits = [{s: (len(p[s]), p[s].starts, p[s].trained) for s in cache.SPLITS} for p in corpus.parts]
    assert corpus.meta["identity"] == corpus_identity(tok.model_proto, splits)
    splits[0]["train"] = (len(train), train.starts, train.trained + 1)
    assert corpus_identity(tok.model_proto, splits) != corpus.meta["identity"]
    # Every window's trained targets are exactly the assistant's contents and <|end|>.
    seq_len = 48
    batch = loader.windows(train, np.arange(loader.num_windows(train, seq_len)) * seq_len, seq_len)
    trained_ids = batch["targets"][batch["loss_mask"] > 0]
    whole = train.take(np.arange(len(train)))
    expected = []
    for start, end in zip(train.starts, [*train.starts[1:], len(train)], strict=True):
        rendered = chat_template.LmjaxTemplate(tok).render(
            chat_template.LmjaxTemplate(tok).parse(whole[start:end])
        )
        expected += [i for i, t in zip(rendered.ids, rendered.trained, strict=True) if t]
    covered = (len(whole) - 1) // seq_len * seq_len  # the windows' targets: tokens 1..covered
    in_windows = np.searchsorted(train.trained, np.arange(1, covered + 1), side="right") % 2 == 1
    assert len(trained_ids) == in_windows.sum() and len(trained_ids) > 0.2 * len(expected)
    assert trained_ids.tolist() == whole[1 : covered + 1][in_windows].tolist()
    assert set(tok.decode(trained_ids.tolist()).split("<|end|>")[:-1]) <= {
        m["content"] for i in range(200) for m in conversation(i) if m["role"] == "assistant"
    } | {""}


def test_parquet_conversations_give_the_same_tokens_as_jsonl(chat_data, chat_folder, tmp_path):
    rows = [json.loads(line) for line in (chat_folder / "a.jsonl").read_text().splitlines()]
    pq.write_table(pa.table({"dialog": [r["messages"] for r in rows]}), tmp_path / "a.parquet")
    from_jsonl = cache.load_or_build(chat_data(chat_folder), log=lambda m: None)
    from_parquet = cache.load_or_build(chat_data(tmp_path, field="dialog"), log=lambda m: None)

    def totals(corpus):  # rows split by line number in one, by row number in the other
        parts = corpus.meta["parts"][0]
        return [sum(parts[s][key] for s in cache.SPLITS) for key in ("tokens", "documents", "trained_tokens")]

    assert totals(from_parquet) == totals(from_jsonl)


@pytest.mark.parametrize(
    "line, expected",
    [
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}',
            "a.jsonl:2: message 1",
        ),
        ('{"text": "plain"}', "a.jsonl:2 has no field 'messages'"),
        ('{"messages": "hello"}', "a.jsonl:2: messages must be a non-empty list"),
    ],
)
def test_a_bad_row_names_its_file_and_line(chat_data, tmp_path, line, expected):
    good = json.dumps({"messages": conversation(1)})
    (tmp_path / "a.jsonl").write_text(f"{good}\n{line}\n")
    with pytest.raises(UserError, match=expected):
        cache.load_or_build(chat_data(tmp_path), log=lambda m: None)


def test_masked_tokens_do_not_reach_the_loss_or_its_gradients(chat_data, chat_folder):
    """Changing a system or user target leaves the loss and gradients bit-identical, as does
    changing a user turn after the last reply (nothing trained sees it); changing one assistant
    target changes both."""
    corpus = cache.load_or_build(chat_data(chat_folder), log=lambda m: None)
    exp = tiny_experiment("llama", f"model.vocab_size={corpus.tokenizer.vocab_size}")
    train = corpus.splits("train")[0]
    batch = loader.windows(train, np.array([0, 64, 200, 333]), 32)
    graphdef, params = nnx.split(model.Transformer(exp.model, rngs=nnx.Rngs(0)))

    def loss_and_grads(b):
        def mean_loss(p):
            ce, count = loss.loss_sums(nnx.merge(graphdef, p), {k: jnp.asarray(v) for k, v in b.items()})
            return ce / count

        value, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
        return np.asarray(value), [np.asarray(g) for g in jax.tree.leaves(grads)]

    base_loss, base_grads = loss_and_grads(batch)
    masked = np.argwhere(batch["loss_mask"] == 0)
    trained = np.argwhere(batch["loss_mask"] > 0)
    assert len(masked) and len(trained)

    changed_masked = {k: v.copy() for k, v in batch.items()}
    for r, t in masked:
        changed_masked["targets"][r, t] = (changed_masked["targets"][r, t] + 11) % exp.model.vocab_size
    value, grads = loss_and_grads(changed_masked)
    assert value.tobytes() == base_loss.tobytes()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(grads, base_grads, strict=True))

    changed_trained = {k: v.copy() for k, v in batch.items()}
    r, t = trained[len(trained) // 2]
    changed_trained["targets"][r, t] = (changed_trained["targets"][r, t] + 11) % exp.model.vocab_size
    value, grads = loss_and_grads(changed_trained)
    assert value != base_loss
    assert any(a.tobytes() != b.tobytes() for a, b in zip(grads, base_grads, strict=True))


def sft_argv(workdir, base, chat_folder, *sets):
    return tiny_train_argv(
        workdir,
        "data.source=chat",
        f"data.path={chat_folder}",
        "data.validation_percent=10",
        f"checkpoint.init_from={base}",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "optim.min_lr_ratio=1.0",  # constant after warmup: the 3-step run's schedule is the 6-step one's
        "train.log_every=1",
        "train.eval_every=3",
        *sets,
    )


def test_sft_warm_starts_learns_the_replies_and_resumes_exactly(short_run, chat_folder, tmp_path, capsys):
    """Fine-tuning a base run on conversations: the base run's tokenizer is reused, held-out
    loss on the assistant's tokens falls, and a resumed run equals the uninterrupted one."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(sft_argv(straight, short_run, chat_folder, "train.steps=6")) == 0
    assert main(sft_argv(resumed, short_run, chat_folder, "train.steps=3")) == 0
    assert main(sft_argv(resumed, short_run, chat_folder, "train.steps=6")) == 0
    assert "resuming from step 3 of 6" in capsys.readouterr().err
    assert (straight / "tokenizer.model").read_bytes() == (short_run / "tokenizer.model").read_bytes()
    losses = {r["step"]: r["loss"] for r in metrics_of(straight) if "loss" in r}
    assert {r["step"]: r["loss"] for r in metrics_of(resumed) if "loss" in r} == losses
    held_out = [r["eval_loss"] for r in metrics_of(straight) if "eval_loss" in r]
    assert held_out[-1] < held_out[0] - 0.3, held_out  # 5.61 -> 5.12 when written


def test_a_chat_corpus_is_not_prepared_on_beam(chat_folder, tmp_path, capsys):
    argv = ["prepare", "--experiment", "stdlib_tiny", "--set", "data.source=chat", "--set"]
    assert (
        data_main(
            [
                *argv,
                f"data.path={chat_folder}",
                "--set",
                f"data.cache_dir={tmp_path}",
                "--runner",
                "DirectRunner",
            ]
        )
        == 2
    )
    assert "build a chat corpus in-process" in capsys.readouterr().err


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_fine_tuning_an_imported_model_renders_with_its_chat_template(short_run, chat_folder, tmp_path):
    """A warm start from a run with chat_template.jinja (an imported model) keeps it: the token
    cache renders conversations with it and trains on the replies and their closing text."""
    base = tmp_path / "imported"
    shutil.copytree(short_run, base)
    (base / "chat_template.jinja").write_text(CHATML)
    workdir = tmp_path / "sft"
    assert main(sft_argv(workdir, base, chat_folder, "train.steps=1")) == 0
    assert (workdir / "chat_template.jinja").read_text() == CHATML
    saved = json.loads((workdir / "config.json").read_text())["data"]
    assert saved["chat_template"] == str(workdir / "chat_template.jinja")
    exp = config.from_dict(json.loads((workdir / "config.json").read_text()))
    corpus = cache.load_or_build(exp.data, log=lambda m: None)
    train = corpus.splits("train")[0]
    tok = corpus.tokenizer
    first = train.take(np.arange(train.starts[1]))  # the first conversation, <s> ... </s>
    assert tok.decode(first.tolist()).startswith("<|im_start|>system\nAnswer with a number.<|im_end|>\n")
    spans = train.trained[: 2 * np.searchsorted(train.trained[::2], train.starts[1])]
    replies = [
        tok.decode(train.take(np.arange(a, b)).tolist()) for a, b in zip(spans[::2], spans[1::2], strict=True)
    ]
    assert replies and all(r.endswith("<|im_end|>\n") and r[:-11].rstrip(".").isdigit() for r in replies)


def test_conversations_on_a_bucket_equal_the_same_file_in_a_folder(chat_data, chat_folder, bucket, tmp_path):
    storage.path(f"{bucket}/chat/a.jsonl").write_text((chat_folder / "a.jsonl").read_text())
    local = cache.load_or_build(chat_data(chat_folder, cache_dir=str(tmp_path / "c")), log=lambda m: None)
    remote = cache.load_or_build(
        chat_data(f"{bucket}/chat", cache_dir=str(tmp_path / "c")), log=lambda m: None
    )
    assert remote.entry != local.entry and remote.meta["parts"] == local.meta["parts"]
    for a, b in zip(
        local.splits("train") + local.splits("validation"),
        remote.splits("train") + remote.splits("validation"),
        strict=True,
    ):
        np.testing.assert_array_equal(a.take(np.arange(len(a))), b.take(np.arange(len(b))))
        np.testing.assert_array_equal(a.trained, b.trained)


def test_a_chat_template_given_is_kept_in_the_run(short_run, chat_folder, tmp_path):
    """data.chat_template=FILE is copied into the run, so lmjax.chat and lmjax.serve render
    with the template the run trained on, whatever becomes of FILE."""
    given = tmp_path / "mine.jinja"
    given.write_text(CHATML)
    workdir = tmp_path / "sft"
    assert (
        main(sft_argv(workdir, short_run, chat_folder, "train.steps=1", f"data.chat_template={given}")) == 0
    )
    given.unlink()
    assert (workdir / "chat_template.jinja").read_text() == CHATML
    saved = json.loads((workdir / "config.json").read_text())["data"]
    assert saved["chat_template"] == str(workdir / "chat_template.jinja")
