"""Retrieval-augmented generation: passages, a BM25 + dense index, and prompts that cite their sources.

    lmforge rag index docs/ --out runs/docs-index [--embed-model models/smollm2]
    lmforge rag search runs/docs-index "how does the with statement work"
    lmforge rag ask runs/docs-index --model models/smollm2 "What does __exit__ return to suppress an exception?"
    lmforge chat models/smollm2 --rag runs/docs-index       # and: lmforge serve ... --rag INDEX

passages.py splits documents, terms.py makes BM25's terms, embed.py the dense vectors, index.py
builds, updates and searches the index, prompt.py puts passages into a chat prompt, cli.py is the command.
"""
