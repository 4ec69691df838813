"""Put retrieved passages into a chat prompt, numbered so the answer can cite them; fit it to the context.

    from lmforge.rag.prompt import with_sources, fit_sources, cited
    hits = index.search(question, k=4)
    messages, used = fit_sources(fmt, history, question, hits, budget=ctx - max_new)
    answer = ...generate...
    cited(answer, used)            # the hits the answer cites as [n]

The sources go into the last user turn, before the question (every chat template keeps a user
turn, not every one keeps a system turn, and a small model reads the question best last):

    Answer the question from the sources below and cite the ones you use as [1], [2]. If they do
    not contain the answer, say so.

    [1] docs/with.txt:4 (The "with" statement)
    The "with" statement is used to ...

    Question: ...

Only the turn being answered carries sources; earlier turns stay as the user typed them, so a
conversation's history does not fill up with old passages. When the prompt does not fit the
budget, the lowest-ranked passages go first; a question that does not fit even without sources
is an LmforgeError.
"""

from __future__ import annotations

import re

from lmforge.errors import LmforgeError

INSTRUCTION = (
    "Answer the question from the sources below and cite the ones you use as [1], [2]. "
    "If they do not contain the answer, say so."
)


def with_sources(question: str, hits) -> str:
    """The user turn: instruction, numbered sources, question."""
    blocks = []
    for i, h in enumerate(hits, start=1):
        where = f"{h.source} ({h.heading})" if h.heading else h.source
        blocks.append(f"[{i}] {where}\n{h.text.strip()}")
    return f"{INSTRUCTION}\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}"


def fit_sources(fmt, history: list[dict], question: str, hits, budget: int) -> tuple[list[dict], list]:
    """(messages, hits kept): history + the question with as many of `hits` (best first) as fit in `budget`
    tokens rendered with `fmt` (a ChatFormat) and its generation prompt."""
    hits = list(hits)
    while True:
        turn = with_sources(question, hits) if hits else question
        messages = [*history, {"role": "user", "content": turn}]
        n = len(fmt.encode(messages, add_generation_prompt=True))
        if n <= budget:
            return messages, hits
        if not hits:
            raise LmforgeError(f"the question is too long: {n} tokens with its history, and the model's context "
                               f"leaves {budget} for the prompt")  # fmt: skip
        hits.pop()


_CITE = re.compile(r"\[(\d{1,3})\]")


def cited(answer: str, hits) -> list:
    """The hits the answer cites as [n], in the order first cited."""
    seen = []
    for m in _CITE.finditer(answer):
        i = int(m.group(1))
        if 1 <= i <= len(hits) and hits[i - 1] not in seen:
            seen.append(hits[i - 1])
    return seen
