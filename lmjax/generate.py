"""`python -m lmjax.generate --workdir DIR --prompt TEXT [--max-tokens N --temperature T ...]`

Samples text from the newest checkpoint of a run, with the tokenizer saved beside it: the
prompt is prefilled at once, then tokens are decoded one at a time against a KV cache laid out
on the mesh like the activations, until </s> or the limit, and streamed to the terminal.

From Python (a notebook): `lmjax.generate.sample(workdir, prompts, ...)`, or keep a
`Generator.from_workdir(workdir)` and call its `sample` (or, for a chat model, `chat(messages)`)
many times (it compiles once per prompt length).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from lmjax import checkpoint, config, model, sampling, sharding, step, storage
from lmjax.config import UserError
from lmjax.data import chat_jinja, chat_template
from lmjax.data.chat_template import Message
from lmjax.data.tokenizer import Tokenizer

# Prompts are left-padded to a multiple of _PROMPT_BUCKET tokens and the cache has a multiple of
# _CACHE_BUCKET slots, so similar lengths and token limits share a compilation.
_PROMPT_BUCKET, _CACHE_BUCKET = 16, 128

Log = Callable[[str], None]
OnText = Callable[[int, str], None]  # (row, the text that row added since the last call)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmjax.generate", description=__doc__.split("\n\n")[1])
    parser.add_argument("--workdir", required=True, help="a run folder with a checkpoint")
    parser.add_argument("--prompt", action="append", required=True, help="text to continue (repeatable)")
    add_sampling_arguments(parser, temperature=0.8)
    parser.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    args = parser.parse_args(argv)
    check_settings(args.max_tokens, args.temperature, args.top_k, args.top_p, args.num_samples)
    return args


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float) -> None:
    """--max-tokens, --temperature (default `temperature`), --top-k, --top-p, --seed and --set."""
    parser.add_argument("--max-tokens", type=int, default=200, help="new tokens at most, per sample")
    parser.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest ids (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="...and of those the likeliest holding p")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override the run's config (mesh.*)"
    )


def check_settings(max_tokens: int, temperature: float, top_k: int, top_p: float, num_samples: int) -> None:
    for ok, problem in [
        (max_tokens >= 1, f"--max-tokens {max_tokens}: give at least 1"),
        (
            temperature >= 0 and math.isfinite(temperature),
            f"--temperature {temperature}: give 0 (greedy) or above",
        ),
        (top_k >= 0, f"--top-k {top_k}: give 0 (off) or more"),
        (0 < top_p <= 1, f"--top-p {top_p}: give a value in (0, 1]"),
        (num_samples >= 1, f"--num-samples {num_samples}: give at least 1"),
    ]:
        if not ok:
            raise UserError(problem)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        generator = Generator.from_workdir(args.workdir, args.set, log=_print)
        # Bytes that are not UTF-8 reach argv as lone surrogates: they become U+FFFD, as in the corpus.
        given = [p.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for p in args.prompt]
        prompts = [p for p in given for _ in range(args.num_samples)]
        streaming = len(prompts) == 1
        if streaming:
            print(prompts[0], end="", flush=True)
        started = time.time()
        texts = generator.sample(
            prompts,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            on_text=(lambda _, text: print(text, end="", flush=True)) if streaming else None,
        )
        if streaming:
            print()
        else:
            for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
                print(f"--- sample {i + 1} of {len(prompts)} ---\n{prompt}{text}")
        _print(f"{generator.last_tokens} tokens in {time.time() - started:.1f} s")
    except UserError as e:
        print(f"lmjax: error: {e}", file=sys.stderr)
        return 2
    return 0


def sample(workdir: storage.PathLike, prompts: str | Sequence[str], **settings: Any) -> list[str]:
    """Continuations of `prompts` by the newest checkpoint in `workdir` (see Generator.sample)."""
    return Generator.from_workdir(workdir).sample(prompts, **settings)


class Generator:
    """Parameters on a mesh, the tokenizer, and the compiled decode step: `from_workdir` for a
    run's newest checkpoint."""

    def __init__(
        self,
        exp: config.Experiment,
        params: nnx.State,
        tokenizer: Tokenizer | None,
        mesh: jax.sharding.Mesh,
        log: Log | None = None,
        folder: storage.Path | None = None,
    ):
        """`params` laid out on `mesh` by `exp`'s rules; `tokenizer` may be None for work on
        ids alone (`generate_ids` then stops only at the `stop_ids` it is given). `log`: notes
        (default: stderr). `folder`: the run's, where an imported chat template is kept
        (chat_jinja.for_run)."""
        self.exp, self.params, self.tokenizer, self.mesh = exp, params, tokenizer, mesh
        self.folder = folder
        self.log = log or _print
        self.eos_id = tokenizer.eos_id if tokenizer else -1
        # Only ids the tokenizer can decode may be picked: an imported model's embedding may have
        # rows past the tokenizer's pieces (a padded LLaMA vocabulary). A traced argument of the
        # decode step, like the sampling settings: one compiled step serves every call.
        self._n_ids = np.int32(tokenizer.vocab_size if tokenizer else exp.model.vocab_size)
        self.last_tokens = 0  # tokens the last `sample` or `chat` call produced
        self.last_stops: list[int | None] = []  # per row of the last call: the stop id it ended at
        self._step = _decode_step(exp.model)
        self._init_cache = jax.jit(functools.partial(model.init_cache, exp.model), static_argnums=1)

    @classmethod
    def from_workdir(
        cls, workdir: storage.PathLike, overrides: Sequence[str] = (), log: Log = print
    ) -> Generator:
        """The newest checkpoint of the run in `workdir` and its tokenizer, on the run's mesh
        (`overrides`: `mesh.*=...` for another machine)."""
        workdir = storage.path(workdir)
        exp = checkpoint.saved_experiment(workdir, list(overrides), log).exp
        mesh = sharding.make_mesh(exp)
        with sharding.use(mesh, exp.mesh.rules):  # every checkpoint of a run has the same shapes
            params, _ = checkpoint.load_params(workdir, mesh, log=log)
        return cls(exp, params, Tokenizer.load(workdir / "tokenizer.model"), mesh, log, workdir)

    def sample(
        self,
        prompts: str | Sequence[str],
        max_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        on_text: OnText | None = None,
    ) -> list[str]:
        """The text each prompt continues with, up to its </s> or `max_tokens` tokens, as
        strings; one prompt may be passed as a string. `on_text(row, text)` gets each row's new
        text as it is decoded (a stream). The same seed gives the same samples."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [[self.tokenizer.bos_id, *self.tokenizer.encode(p)] for p in prompts]
        return self.text_of(ids, max_tokens, temperature, top_k, top_p, seed, on_text)

    def chat(
        self,
        conversations: Sequence[Message] | Sequence[Sequence[Message]],
        max_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        on_text: OnText | None = None,
    ) -> list[str]:
        """The assistant's next reply to each conversation (messages `{"role", "content"}`;
        one conversation may be passed alone), rendered with the run's chat template and
        decoded up to its end-of-turn piece or `max_tokens`. As `sample` otherwise."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        ids = [self.template.prompt(c) for c in conversations]  # prompt() checks each message
        return self.text_of(ids, max_tokens, temperature, top_k, top_p, seed, on_text, self.template.stop_ids)

    @functools.cached_property
    def template(self) -> chat_template.ChatTemplate:
        """The run's chat template (chat_jinja.for_run); UserError for a tokenizer without one."""
        if self.tokenizer is None:
            raise UserError("this generator has no tokenizer, so no chat template")
        if self.folder is None:
            return chat_template.LmjaxTemplate(self.tokenizer)
        return chat_jinja.for_run(self.folder, self.tokenizer)

    def text_of(
        self,
        prompt_ids: Sequence[Sequence[int]],
        max_tokens: int,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int,
        on_text: OnText | None = None,
        stop_ids: Sequence[int] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[str]:
        """`generate_ids` decoded to text, streamed to `on_text(row, text)` as it grows."""
        check_settings(max_tokens, temperature, top_k, top_p, 1)
        tok = self.tokenizer
        streams = [TextStream(tok.decode) for _ in prompt_ids]

        def on_tokens(row: int, new_ids: list[int]) -> None:
            text = streams[row].add(new_ids)
            if on_text and text:
                on_text(row, text)

        out = self.generate_ids(
            prompt_ids, max_tokens, temperature, top_k, top_p, seed, on_tokens, stop_ids, cancelled
        )
        self.last_tokens = sum(map(len, out))
        for row, stream in enumerate(streams):  # what a character cut short held back
            tail = stream.finish()
            if on_text and tail:
                on_text(row, tail)
        return [tok.decode(row) for row in out]

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        max_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        on_tokens: Callable[[int, list[int]], None] | None = None,
        stop_ids: Sequence[int] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[list[int]]:
        """New token ids for each prompt (ids, <s> included), up to the first of `stop_ids`
        (default: </s>), which is left out. `cancelled(row)`: that row is no longer wanted (a
        client went away); decoding ends when every row is done or cancelled. `last_stops`
        holds, per row, the stop id it ended at (None: the token limit, or cancelled)."""
        prompts_BT, start_B, max_tokens = self._layout(prompt_ids, max_tokens)
        rows = len(prompt_ids)
        key = jax.random.key(seed)
        settings = (np.float32(temperature), np.int32(top_k), np.float32(top_p), self._n_ids)
        stops = set((self.eos_id,) if stop_ids is None else stop_ids)
        out: list[list[int]] = [[] for _ in range(rows)]
        done = np.zeros(rows, bool)
        self.last_stops = [None] * rows
        with self._on_mesh():
            slots = _round_up(prompts_BT.shape[1] + max_tokens, _CACHE_BUCKET)
            cache = self._init_cache(start_B, slots)
            next_B, cache = self._step(self.params, prompts_BT, cache, jax.random.fold_in(key, 0), *settings)
            for i in range(max_tokens):
                token_B = next_B
                if i + 1 < max_tokens:  # queue the next step before reading this one's tokens
                    key_i = jax.random.fold_in(key, i + 1)
                    next_B, cache = self._step(self.params, token_B[:, None], cache, key_i, *settings)
                for b, t in enumerate(np.asarray(token_B)[:rows]):
                    if done[b] or (cancelled and cancelled(b)):
                        done[b] = True
                        continue
                    if int(t) in stops:
                        done[b], self.last_stops[b] = True, int(t)
                    else:
                        out[b].append(int(t))
                        if on_tokens:
                            on_tokens(b, [int(t)])
                if done.all():
                    break
        return out

    def room(self, prompt_tokens: int) -> int:
        """New tokens the model's context leaves after a prompt of `prompt_tokens` (<s> included):
        positions end at seq_len - 1 (GPT-2's are learned), and the last new token is never fed
        back, so one more than the positions left."""
        return self.exp.model.seq_len - prompt_tokens + 1

    def _layout(
        self, prompt_ids: Sequence[Sequence[int]], max_tokens: int
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Left-padded prompts `[B, T]` (rows padded to a multiple of the batch shards), where
        each row's prompt starts, and `max_tokens` cut to what the model's context leaves."""
        context = self.exp.model.seq_len
        longest = max(map(len, prompt_ids))
        if longest > context:
            raise UserError(
                f"a prompt is {longest} tokens (with <s>) but the model's context, model.seq_len, is "
                f"{context}; shorten the prompt"
            )
        if max_tokens > self.room(longest):
            max_tokens = self.room(longest)
            self.log(f"max tokens cut to {max_tokens}: the longest prompt leaves that much of the context")
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        B = _round_up(len(prompt_ids), shards)
        T = _round_up(longest, _PROMPT_BUCKET)
        padded = [*prompt_ids, *[prompt_ids[0]] * (B - len(prompt_ids))]
        prompts_BT = np.zeros((B, T), np.int32)
        start_B = np.array([T - len(p) for p in padded], np.int32)
        for b, p in enumerate(padded):
            prompts_BT[b, start_B[b] :] = p
        return prompts_BT, start_B, max_tokens

    def _on_mesh(self) -> contextlib.AbstractContextManager[None]:
        return sharding.use(self.mesh, self.exp.mesh.rules)


class TextStream:
    """A row's decoded text, handed out as it grows; an unfinished UTF-8 character (byte
    pieces still to come) is held back."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode, self._ids, self._shown = decode, [], 0

    def add(self, ids: list[int]) -> str:
        self._ids += ids
        text = self._decode(self._ids).rstrip("\ufffd")
        new, self._shown = text[self._shown :], max(self._shown, len(text))
        return new

    def finish(self) -> str:
        """The rest, a character cut short included (as U+FFFD): the row is done."""
        text = self._decode(self._ids)
        rest, self._shown = text[self._shown :], len(text)
        return rest


def _decode_step(cfg: config.Model) -> Callable:
    """(params, tokens_BT, cache, key, temperature, top_k, top_p, n_ids) -> (next ids [B], cache):
    the tokens go through the model against the cache, and the last position picks the next
    among the ids below n_ids."""
    graphdef, _ = step.abstract_model(cfg)

    def decode(params, tokens_BT, cache, key, temperature, top_k, top_p, n_ids):
        logits_B1V, cache = nnx.merge(graphdef, params).decode(tokens_BT, cache, last_only=True)
        return sampling.choose(logits_B1V[:, 0], key, temperature, top_k, top_p, n_ids), cache

    return jax.jit(decode, donate_argnums=2)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _print(message: str) -> None:
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
