"""Tool-using agents: typed tools (tools.py; the exact calculator in calc.py), the tool-calling loop with limits
(loop.py), tool-use traces for fine-tuning (traces.py) and the `lmforge agent` command (cli.py).

    lmforge agent models/smollm2 --tools calc,convert "What is 4821 * 377?"
    lmforge agent models/smollm2 --tools search --rag runs/pydoc-index "What does a failing assert raise?"
"""
