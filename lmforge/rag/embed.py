"""Dense passage vectors from an lmforge model: mean-pooled final hidden states, L2-normalized.

    from lmforge.rag.embed import Embedder
    emb = Embedder("models/smollm2")            # a run, checkpoint or imported folder; decoder or encoder (BERT)
    vecs = emb(["first passage", "second"])     # (2, d) float32, unit rows: cosine = dot product

Mean pooling over the real tokens is the usual sentence vector for a model not trained for
retrieval (Sentence-BERT's default); a decoder's positions see only what comes before them, so
its mean is dominated by early tokens, which is why BENCHMARKS.md reports dense recall beside
BM25 rather than assuming it helps. Texts are cut to `max_tokens` (the model's context at most),
batched by length so padding stays small; a decoder is right-padded (causal attention keeps the
padding out of the real positions), an encoder masks its padding keys.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.tokenizer.special import load_tokenizer, pad_id


class Embedder:
    def __init__(self, model_path: str, device: str = "cpu", max_tokens: int = 256, batch_size: int = 16):
        from lmforge.train import checkpoint as ckpt

        model, where, meta = ckpt.load_model(model_path, encoder_ok=True)
        if model.cfg.family == "encoder-decoder":
            from lmforge.errors import LmforgeError

            raise LmforgeError(f"{model_path}: an encoder-decoder (T5) is not an embedding model here; use a decoder "
                               "or an encoder (BERT)")  # fmt: skip
        self.model = model.to(device).eval()
        self.device, self.batch_size = torch.device(device), batch_size
        self.tokenizer = load_tokenizer(ckpt.tokenizer_dir(where, meta))
        self.pad = pad_id(self.tokenizer) or 0
        self.max_tokens = min(max_tokens, model.cfg.max_seq_len)
        self.encoder = model.cfg.family == "encoder"
        self.dim = model.cfg.d_model
        self.fingerprint = ckpt.file_fingerprint(ckpt.weights_path(where, meta))

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encoded = self.tokenizer.encode_batch(texts, add_special_tokens=self.encoder)
        ids = [(e.ids[: self.max_tokens] or [self.pad]) for e in encoded]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                T = max(len(ids[i]) for i in rows)
                idx = torch.full((len(rows), T), self.pad, dtype=torch.long)
                real = torch.zeros((len(rows), T), dtype=torch.bool)
                for r, i in enumerate(rows):
                    idx[r, : len(ids[i])] = torch.tensor(ids[i])
                    real[r, : len(ids[i])] = True
                idx, real = idx.to(self.device), real.to(self.device)
                if self.encoder:
                    hidden, _ = self.model(idx, key_mask=real, head="hidden")
                else:
                    hidden, _ = self.model(idx, return_hidden=True)
                w = real.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * w).sum(1) / w.sum(1)
                pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
                out[rows] = pooled.cpu().numpy()
        return out
