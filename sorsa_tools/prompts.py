"""Prompt templates shared by training and evaluation, so that both see the same text."""

from __future__ import annotations

# Paper, Listing 1 (GSM-8K and MATH), verbatim including its "Lets".
PAPER_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{question}\n\n### Response: Lets think step by step."
)
RESPONSE_SEPARATOR = " "  # between the prompt and the response in the paper template

TEMPLATES = ("paper", "raw", "chat", "chatml")  # chatml: ChatML markers, for tokenizers without a template

# (prompt field, response field) pairs tried in order when --fields is not given.
FIELD_PAIRS = (
    ("question", "answer"),  # GSM-8K
    ("query", "response"),  # MetaMathQA
    ("instruction", "output"),  # Alpaca-style
    ("prompt", "completion"),
    ("input", "output"),
)


def render_prompt(question: str, template: str, tokenizer=None) -> str:
    """The text a model sees before its response."""
    if template == "paper":
        return PAPER_TEMPLATE.format(question=question)
    if template in ("chat", "chatml"):
        from sorsa_tools.chat import CHATML

        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            chat_template=CHATML if template == "chatml" else None,
            tokenize=False,
            add_generation_prompt=True,
        )
    return question


def join(prompt: str, response: str, template: str) -> str:
    """prompt + response as one text (for raw mode and for reading)."""
    sep = RESPONSE_SEPARATOR if template == "paper" else ""
    return prompt + sep + response


def response_prefix(template: str) -> str:
    return RESPONSE_SEPARATOR if template == "paper" else ""
