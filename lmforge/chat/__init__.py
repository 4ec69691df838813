"""Conversations for instruction tuning: read chat datasets (`datasets.py`), render them (`template.py`).

`lmforge sft` reads its data like this:

    from lmforge.chat.datasets import load_conversations, summarize
    cs = load_conversations("chitchat")
    print(summarize(cs))
"""
