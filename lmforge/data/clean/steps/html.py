"""`extract_html`: the main text of an `.html` document (raw page in `metadata["html"]`) with trafilatura
(Barbaresi 2021); menus, footers and scripts are dropped. Documents without `metadata["html"]` pass
through unchanged, so the step can lead any pipeline. A page with no extractable text is rejected."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.data.readers import Document


@dataclass
class ExtractHtmlConfig:
    include_tables: bool = False
    include_comments: bool = False  # reader comments under an article
    favor_precision: bool = False  # trafilatura's switch: less boilerplate, at the risk of losing text
    keep_html: bool = False  # keep the raw page in metadata["html"] after extraction


def extract_html(doc: Document, cfg: ExtractHtmlConfig) -> Document | str:
    html = doc.metadata.get("html")
    if html is None:
        return doc
    import trafilatura

    text = trafilatura.extract(
        html,
        include_tables=cfg.include_tables,
        include_comments=cfg.include_comments,
        favor_precision=cfg.favor_precision,
        deduplicate=False,
    )
    if not cfg.keep_html:
        del doc.metadata["html"]
    if not text or not text.strip():
        return "no_main_text"
    doc.text = text
    return doc
