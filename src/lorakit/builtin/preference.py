"""The built-in dataset's records for the objectives other than SFT, derived from its chat tasks
(`tasks.py`), so `lorakit train training.objective=dpo` (or kto, grpo) runs offline like SFT does.

    paired    {"prompt": [user], "chosen": [assistant: the answer], "rejected": [assistant: a wrong one]}
    unpaired  {"prompt": [user], "completion": [assistant: the answer or a wrong one], "label": right?}
    prompts   {"prompt": [user], "answer": the answer}        (the exact_answer reward reads `answer`)

They are records in the forms user files take, so they go through the same conversion
(`lorakit.train.preference_data`). A wrong answer is a valid answer of the same task
(`tasks.wrong_answer`), drawn with a `random.Random` seeded from the data seed and the prompt: the
derived data is the same on every call and for every training seed, like the files it comes from.
Unpaired labels alternate along each file (right, wrong, right, ...), so desirable and undesirable
examples are balanced, as KTO's default weights assume.
"""

from __future__ import annotations

import random

from .tasks import SEED, wrong_answer

Record = tuple[dict, str]


def preference_records(records: list[Record], kind: str) -> list[Record]:
    """The chat records of one built-in split file (in file order) as `kind` records ("paired",
    "unpaired" or "prompts"), one for one, each keeping its source."""
    out = []
    for index, (record, source) in enumerate(records):
        user, assistant = record["messages"]
        prompt, answer = user["content"], assistant["content"]
        wrong = wrong_answer(prompt, answer, random.Random(f"{SEED}:{prompt}"))
        if kind == "paired":
            derived = {"prompt": [user], "chosen": [_said(answer)], "rejected": [_said(wrong)]}
        elif kind == "unpaired":
            right = index % 2 == 0
            derived = {"prompt": [user], "completion": [_said(answer if right else wrong)], "label": right}
        elif kind == "prompts":
            derived = {"prompt": [user], "answer": answer}
        else:
            raise ValueError(f"unknown kind of preference record {kind!r}; one of paired, unpaired, prompts")
        out.append((derived, source))
    return out


def _said(text: str) -> dict:
    return {"role": "assistant", "content": text}
