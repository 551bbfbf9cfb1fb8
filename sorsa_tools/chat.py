"""Conversations: `messages` records (role/content: TRL, OpenAI, Code-Feedback) and ShareGPT's
`conversations` (from/value), rendered with a chat template, loss on the assistant turns only.

The token ids are exactly the template's own rendering of the whole conversation, tokenized once.
Which of them carry loss is found in text, not guessed in tokens: for assistant turn i, the
rendering of turns < i with the generation prompt is a prefix of the rendering of turns <= i, and
the characters between the two are that turn as the template writes it (its text and its
end-of-turn marker, which the model must learn in order to stop). A token carries loss when it
starts inside such a span.
"""

from __future__ import annotations

from collections.abc import Callable

from sorsa_tools.errors import DataError

# column -> (role key, text key) of each turn
CONVERSATION_COLUMNS = {"messages": ("role", "content"), "conversations": ("from", "value")}
# ShareGPT's speaker names -> roles (chat templates know user, assistant, system)
ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
# for a tokenizer without a chat template: --template chatml
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IGNORE = -100


def is_conversation(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, dict) for t in value)


def to_messages(value, column: str, where: str) -> list[dict]:
    """A record's turns as [{"role", "content"}], roles normalised; one-line errors name the turn."""
    role_key, text_key = CONVERSATION_COLUMNS.get(column, ("role", "content"))
    if not is_conversation(value):
        raise DataError(
            f"{where}: field {column!r} must be a list of turns ({{{role_key!r}: ..., {text_key!r}: ...}}); "
            "fix or remove the record"
        )
    out = []
    for n, turn in enumerate(value, 1):
        rk, tk = (role_key, text_key) if role_key in turn else ("role", "content")
        if rk not in turn and "from" in turn:
            rk, tk = "from", "value"
        role = ROLES.get(str(turn.get(rk, "")).lower())
        text = turn.get(tk)
        if role is None:
            raise DataError(
                f"{where}: turn {n} of {column!r} has role {turn.get(rk)!r}; roles are user, assistant "
                "and system (ShareGPT: human, gpt, system)"
            )
        if not isinstance(text, str):
            raise DataError(f"{where}: turn {n} of {column!r} has no text ({tk!r} must be a string)")
        out.append({"role": role, "content": text})
    if not any(t["role"] == "assistant" for t in out):
        raise DataError(f"{where}: the conversation in {column!r} has no assistant turn to train on")
    return out


def renderer(tokenizer, template: str) -> Callable[..., str]:
    """render(messages, add_generation_prompt) with the tokenizer's chat template or ChatML."""
    if template == "chatml":
        chat_template = CHATML
    elif getattr(tokenizer, "chat_template", None):
        chat_template = None
    else:
        raise DataError(
            "the data holds conversations but this tokenizer has no chat template; pass --template chatml "
            "(ChatML markers) or use the tokenizer of an instruct model"
        )

    def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    return render


def assistant_spans(messages: list[dict], render, where: str) -> tuple[str, list[tuple[int, int]]]:
    """(whole rendering, [(start, end)] character spans of every assistant turn in it)."""
    try:
        whole = render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = render(messages[:i], add_generation_prompt=True)
            upto = render(messages[: i + 1])
            if not (upto.startswith(before) and whole.startswith(upto)):
                raise DataError(
                    f"{where}: the chat template writes turn {i + 1} differently once later turns follow "
                    "(e.g. it drops earlier reasoning), so its loss cannot be placed; split the record into "
                    "one conversation per assistant turn"
                )
            spans.append((len(before), len(upto)))
    except DataError:
        raise
    except Exception as e:  # jinja's raise_exception (e.g. roles must alternate) and template errors
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{where}: the chat template refuses this conversation ({msg})") from None
    return whole, spans


def encode(tokenizer, whole: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(input ids, labels): the rendering tokenized as it is (the template wrote BOS), labels on
    tokens that start inside an assistant span."""
    enc = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels, k = enc["input_ids"], [], 0
    for tid, (s, e) in zip(ids, enc["offset_mapping"], strict=True):
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        inside = k < len(spans) and spans[k][0] <= s < spans[k][1] and e > s
        labels.append(tid if inside else IGNORE)
    return ids, labels


def check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            "conversations need a fast tokenizer (tokenizer.json: its character offsets place the loss); "
            "save the model with its tokenizer.json"
        )
