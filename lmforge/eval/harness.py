"""lm-evaluation-harness on lmforge's engine: `lmforge eval MODEL --harness TASKS`, and a harness model class.

    pip install "lmforge[eval]"                                   # lm-eval is an optional extra
    lmforge eval runs/demo/sft --harness arc_easy --limit 100     # any task the harness has locally
    lmforge eval models/smollm2 --harness my_task --harness-include tasks/   # a folder of task YAMLs

    import lm_eval
    from lmforge.eval.harness import LmforgeLM                    # also registers the name "lmforge"
    lm_eval.simple_evaluate(model=LmforgeLM("runs/demo/sft"), tasks=["arc_easy"])
    lm_eval.simple_evaluate(model="lmforge", model_args="pretrained=runs/demo/sft", tasks=["arc_easy"])

`LmforgeLM` implements the harness's three requests on an lmforge model (any run, checkpoint or imported
model): `loglikelihood` (requests that share a context, as the choices of one question do, run the context
once for all its continuations: lmforge/eval/scoring.py, score_pairs), `loglikelihood_rolling`
(the harness's disjoint rolling windows, each token predicted once) and `generate_until` (batched KV-cache
decoding that ends a row at the first stop string). Tokenization is the harness's own (TemplateLM: trailing
context spaces move to the continuation; no special tokens added; an empty context is the BOS token if the tokenizer names one, else
the end-of-text token, as HFLM does), so on the same model exported with `lmforge export` the numbers equal
HFLM's (tests/test_harness.py; BENCHMARKS.md).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from lmforge.errors import LmforgeError
from lmforge.eval.mc import unknown_token_id
from lmforge.eval.scoring import score_pairs
from lmforge.tokenizer.special import EOT, load_tokenizer


@register_model("lmforge")
class LmforgeLM(TemplateLM):
    """An lmforge model as an lm-evaluation-harness `LM`. `pretrained`: run, checkpoint or imported model folder."""

    def __init__(self, pretrained: str, device: str = "auto", batch_size: int | str = 8, max_gen_toks: int = 256,
                 seed: int = 0, token_budget: int = 0, dtype: str = "float32", loaded: tuple | None = None,
                 **_ignored) -> None:  # fmt: skip
        from lmforge.train.checkpoint import load_for_inference
        from lmforge.train.common import pick_device

        super().__init__()
        # `loaded`: (model, tokenizer folder) already in memory (lmforge eval with built-in and harness tasks)
        self.model, tok_dir = loaded or load_for_inference(pretrained, pick_device(device))[:2]
        if dtype != "float32":  # float64: parity checks without float32 rounding (benchmarks/harness_parity.py)
            self.model = self.model.to(getattr(torch, dtype))
        self.tok = load_tokenizer(tok_dir)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> 8
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)
        # loglikelihood: rows x tokens of one forward (score_groups; 0: mc's default for the device)
        self.token_budget = int(token_budget) or None
        self._device = next(self.model.parameters()).device
        special = _special_tokens(Path(tok_dir))
        self._eot = self._token_id(special.get("eos_token") or EOT)
        self._prefix = self._token_id(special["bos_token"]) if special.get("bos_token") else self._eot
        self._unk = unknown_token_id(self.tok)  # a request whose text gives it is an error

    def _token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise LmforgeError(f"the tokenizer has no token {token!r} (named in its tokenizer_config.json)")
        return i

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tok.encode(string, add_special_tokens=bool(add_special_tokens)).ids
        if self._unk is not None and self._unk in ids:
            raise LmforgeError(f"the model's tokenizer cannot encode {string[:60]!r}... (unknown token)")
        return ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Requests with the same context tokens are scored together, the context run once; many contexts run
        in one forward (score_pairs)."""
        for req in requests:
            if not req[2]:
                raise LmforgeError(f"a continuation encodes to no tokens: {req[0]!r}")
        with torch.no_grad(), tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm) as bar:
            out = score_pairs(self.model, [(ctx, cont) for _, ctx, cont in requests], self.token_budget, bar.update)
        for req, score in zip(requests, out, strict=True):
            if req[0] is not None:
                self.cache_hook.add_partial("loglikelihood", req[0], score)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log P over the whole string, in the harness's disjoint windows of max_length tokens; the windows of
        all the requests are scored together, batched (score_pairs)."""
        pairs, owner = [], []
        for i, req in enumerate(requests):
            (string,) = req.args
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))  # fmt: skip
            for ctx, cont in windows:
                if cont:
                    pairs.append((list(ctx), list(cont)))
                    owner.append(i)
        with torch.no_grad(), tqdm(total=len(pairs), desc="loglikelihood_rolling", disable=disable_tqdm) as bar:
            scores = score_pairs(self.model, pairs, self.token_budget, bar.update)
        out = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores, strict=True):
            out[i] += ll
        for req, total in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when a task asks) continuations, cut at the first stop string."""
        from lmforge.serve.generate import generate

        by_kwargs = defaultdict(list)  # the same generation settings run in one batch
        for i, req in enumerate(requests):
            by_kwargs[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for key, idx in by_kwargs.items():
            kw = json.loads(key)
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            eos = self.tok_decode([self.eot_token_id])
            until += [] if eos in until else [eos]
            n_new = int(kw.get("max_gen_toks") or kw.get("max_new_tokens") or self.max_gen_toks)
            if n_new >= self.max_length:
                raise LmforgeError(f"max_gen_toks {n_new} must be less than the model's max_seq_len {self.max_length}")
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            idx.sort(key=lambda i: -len(requests[i].args[0]))  # similar lengths share a batch: less padding

            def stop_when(row: int, ids: list[int], until=until) -> bool:
                text = self.tok_decode(ids)
                return any(s and s in text for s in until)

            for j in range(0, len(idx), self.batch_size):
                chunk = idx[j : j + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - n_new) :] or [self._prefix]
                           for i in chunk]  # fmt: skip
                new = generate(self.model, prompts, n_new, temperature=temperature, top_p=kw.get("top_p"),
                               stop_ids=[self.eot_token_id], seed=self.seed, stop_when=stop_when)  # fmt: skip
                for i, ids in zip(chunk, new, strict=True):
                    text = self.tok_decode(ids)
                    for s in until:  # the text before the first stop string (the harness's post-processing)
                        text = text.split(s)[0] if s else text
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out


def _special_tokens(tok_dir: Path) -> dict:
    """bos/eos token strings from tokenizer_config.json ({} when absent), as transformers reads them."""
    path = tok_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LmforgeError(f"{path}: unreadable ({e})") from None
    out = {}
    for key in ("bos_token", "eos_token"):
        value = cfg.get(key)
        out[key] = value.get("content") if isinstance(value, dict) else value
    return out


def task_manager(tasks: list[str], include: str = ""):
    """The harness's task index for `tasks`, checked: every name must be a task it knows. With `include` (a folder
    of task YAMLs), the folder alone is indexed when it holds them all (indexing the ~15,000 built-in tasks takes
    ~15 s on 2 cores)."""
    from lm_eval.tasks import TaskManager

    if include and not Path(include).is_dir():
        raise LmforgeError(f"--harness-include {include}: not a folder of task YAML files")
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor in {include})" if include else " (add --harness-include DIR for local task YAMLs)"
        raise LmforgeError(f"unknown harness task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{where}")
    return manager


def run_harness(lm: LmforgeLM, tasks: list[str], manager, shots: int | None = None, limit: int = 0,
                seed: int = 0) -> dict:  # fmt: skip
    """Run harness `tasks` (indexed by `manager`: task_manager) on `lm`: {"results": {task: {metric: value, "n",
    "shots"}}, "samples": {task: [each request's arguments, our responses, its metrics]}}."""
    import lm_eval

    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, limit=limit or None,
                                  task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=1000,
                                  log_samples=True)  # fmt: skip
    out = {}
    for task in tasks:
        metrics = res["results"].get(task, {})
        out[task] = {k.replace(",none", ""): v for k, v in metrics.items() if k != "alias" and v != "N/A"}
        out[task]["n"] = len(res["samples"].get(task, []))
        out[task]["shots"] = res.get("n-shot", {}).get(task, shots or 0)
    return {"results": out, "samples": {t: res["samples"].get(t, []) for t in tasks}}
