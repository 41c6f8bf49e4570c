"""Chat conversations: the messages format, the chat template (set in gin) and their token sequences.

A conversation is the common `messages` format, a JSON object a line in a JSONL file:

    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris."}, ...]}

The template cuts a conversation into parts that alternate prompt, answer, prompt, answer: a prompt
part is the turns between two assistant turns, each written with its role's marker, ending with the
marker that opens the assistant turn; an answer part is one assistant turn's content. Every part is
tokenized on its own and ends with EOS, so that
  - an answer ends with EOS, where every decoder of t5lite stops;
  - a prompt ends with EOS, as t5lite's inputs and prompts do (seqio tasks, t5lite.infer, the server):
    the encoder of an encoder-decoder and a decoder-only model read the same prompt tokens in training,
    in t5lite.infer and in the server's /v1/chat/completions.
render() shows the token sequence as text, EOS written "</s>" (the shipped vocabulary's EOS piece):

    <|system|>\nAnswer briefly.\n<|user|>\nWhat is the capital of France?\n<|assistant|></s>Paris.</s>

This module needs neither TensorFlow nor seqio (the server imports it); tasks.add_chat_task makes
seqio tasks of chat files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import gin

from t5lite.errors import UserError

ROLES = ("system", "user", "assistant")
EOS_TEXT = "</s>"  # how render() writes EOS, which ends every part (it is a token, not text)
Messages = Sequence[dict]
Encode = Callable[[str], Sequence[int]]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """How each role's turn is written (gin: ChatTemplate.user = '### User:\\n{content}\\n', ...).

    system, user: a turn of that role, "{content}" standing for its text. assistant: the marker that
    opens an assistant turn (the assistant's content is the answer part that follows; see the module
    docstring). The default markers are made of pieces the shipped SentencePiece vocabulary has ("<",
    "|", ">", role words, and the newline piece), so they take 5-9 tokens, no byte fallback, and read
    unlike prose. Change them in gin before training: decoding must use the template it trained with
    (a run's MODEL_DIR/config.gin keeps the bindings, and the server reads it).
    """

    system: str = "<|system|>\n{content}\n"
    user: str = "<|user|>\n{content}\n"
    assistant: str = "<|assistant|>"

    def __post_init__(self):
        for role in ("system", "user"):
            if getattr(self, role).count("{content}") != 1:
                raise UserError(f"ChatTemplate.{role}={getattr(self, role)!r} must hold '{{content}}' exactly once.")
        if not self.assistant:
            raise UserError("ChatTemplate.assistant (the marker that opens an assistant turn) must not be empty.")

    def parts(self, messages: Messages, *, answer_next: bool = False) -> list[tuple[str, bool]]:
        """[(text, is_answer)]: the prompt and answer parts of a checked conversation, in order. A
        conversation that ends with a user or system turn ends with a prompt part (the one to answer);
        answer_next: one that ends with an assistant turn too (a bare assistant marker)."""
        out, prompt = [], ""
        for message in messages:
            if message["role"] == "assistant":
                out += [(prompt + self.assistant, False), (message["content"], True)]
                prompt = ""
            else:
                prompt += getattr(self, message["role"]).replace("{content}", message["content"])
        if prompt or answer_next:
            out.append((prompt + self.assistant, False))
        return out

    def render(self, messages: Messages) -> str:
        """The conversation as text: its parts, each followed by EOS_TEXT."""
        return "".join(text + EOS_TEXT for text, _ in self.parts(messages))


def check_messages(row: dict, *, to_answer: bool = False) -> str | None:
    """The first problem of a conversation row ({"messages": [...]}), or None. Training rows need an
    assistant turn; a row `to_answer` (decoding) must end with a user turn."""
    messages = row.get("messages")
    if not isinstance(messages, list):
        return "needs a 'messages' list of {\"role\": ..., \"content\": ...} objects"
    if not messages:
        return "'messages' is empty"
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"message {i} is not an object with 'role' and 'content'"
        if message["role"] not in ROLES:
            return f"message {i} has role {message['role']!r}; the roles are {', '.join(ROLES)}"
        if not isinstance(message["content"], str):
            return f"message {i} ({message['role']}) has content of type {type(message['content']).__name__}, " \
                   "not a string"
    if to_answer and messages[-1]["role"] != "user":
        return f"the last message is a {messages[-1]['role']} turn; a conversation to answer ends with a user turn"
    if not to_answer and not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn, so nothing to train on"
    return None


def training_tokens(template: ChatTemplate, messages: Messages, encode: Encode,
                    eos_id: int) -> tuple[list[int], list[int]]:
    """(ids, loss weights) of a conversation for a causal LM: 1 on every answer's tokens and its EOS,
    0 on the prompt parts (markers, system and user turns). Turns after the last assistant turn teach
    nothing and are left out."""
    ids, weights = [], []
    parts = template.parts(messages)
    last_answer = max(i for i, (_, is_answer) in enumerate(parts) if is_answer)
    for text, is_answer in parts[:last_answer + 1]:
        tokens = [*encode(text), eos_id]
        ids += tokens
        weights += [int(is_answer)] * len(tokens)
    return ids, weights


def prompt_tokens(template: ChatTemplate, messages: Messages, encode: Encode, eos_id: int) -> list[int]:
    """The ids a model reads to answer a conversation that ends with a user turn (EOS last): the
    encoder's input of an encoder-decoder, the prompt of a decoder-only model."""
    return [token for text, _ in template.parts(messages, answer_next=True) for token in (*encode(text), eos_id)]


def answer_examples(template: ChatTemplate, messages: Messages, encode: Encode, eos_id: int, *,
                    every_turn: bool = False) -> list[tuple[list[int], list[int]]]:
    """[(inputs, targets)] for an encoder-decoder (or prefix LM): inputs the history up to an assistant
    turn (EOS last), targets that turn's content (no EOS: the task appends it after truncation). The
    last assistant turn only, or every_turn: one example per assistant turn."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return [(prompt_tokens(template, messages[:i], encode, eos_id), list(encode(messages[i]["content"])))
            for i in (turns if every_turn else turns[-1:])]
