"""`lmforge report`: one self-contained HTML page + Markdown for a run, built here from a small synthetic run folder
laid out the way `lmforge run` writes one (stages.json, clean/, tokenizer/, shards/, pretrain/, sft/, grpo/,
samples.txt, chat.txt, align.json, eval/<stage>/results.json); the headless-browser test needs `chromium`."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.eval.report import read_metrics, write_report

SECTIONS = ("Summary", "Data funnel", "Tokenizer", "Training curves", "Evaluations", "Samples", "Configs")


def _mc(acc_norm: float, lo: float, hi: float) -> dict:
    return {"n": 500, "acc": acc_norm + 0.01, "acc_lo": lo, "acc_hi": hi, "acc_norm": acc_norm, "acc_norm_lo": lo,
            "acc_norm_hi": hi, "chance": 0.25, "form": "cloze", "shots": 0, "seconds": 1.0}  # fmt: skip


def _results(model: str, tasks: dict) -> str:
    return json.dumps({"model": model, "config": {"model": model}, "tasks": tasks})


def _jsonl(records: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _train(steps: range, tokens_per_step: int, **extra) -> list[dict]:
    return [{"step": s, "loss": 8.0 / (1 + s / 10), "lr": 1e-3 * min(1.0, s / 20), "grad_norm": 1.0,
             "tokens": s * tokens_per_step, "tokens_per_s": 2000.0 + s, "epoch": 0, "skipped": 0, **extra}
            for s in steps]  # fmt: skip


def make_run(root: Path) -> Path:
    """A small recipe run: every file the report reads, with the keys `lmforge run` writes."""
    run = root / "demo"
    # fmt: off
    files = {
        "stages.json": json.dumps({
            "clean": {"key": "a", "config": {"steps": [{"name": "language"}]}, "upstream": {}, "done": True,
                      "step": None, "stopped": None},
            "tokenizer": {"key": "b", "config": {"vocab_size": 512}, "done": True, "step": None, "stopped": None},
            "tokenize": {"key": "c", "config": {"val_fraction": 0.1}, "done": True, "step": None, "stopped": None},
            "pretrain": {"key": "d", "config": {"max_steps": 40}, "done": True, "step": 40, "stopped": None},
            "sft": {"key": "e", "config": {"max_steps": 20}, "done": True, "step": 20, "stopped": None},
            "grpo": {"key": "f", "config": {"max_steps": 20}, "done": False, "step": 10, "stopped": "time_budget"},
        }),
        "clean/report.json": json.dumps({
            "counts": {"input": 5, "kept": 3, "rejected": 2, "unreadable": 0}, "identity_holds": True,
            "per_step": {"language": {"in": 5, "rejected": 1}, "gopher_repetition": {"in": 4, "rejected": 1}},
            "per_reason": {"language/language_not_kept": 1, "gopher_repetition/duplicate_lines": 1},
            "per_language": {"en": {"kept": 3, "rejected": 1}, "ja": {"rejected": 1}}, "seconds": 1.5,
        }),
        "clean/kept/part-00000.jsonl": _jsonl([{"id": str(i), "text": "abcd" * 10} for i in range(3)]),
        "clean/rejected/part-00000.jsonl": _jsonl([
            {"id": "3", "text": "日本語のテキスト", "step": "language", "reason": "language_not_kept"},
            {"id": "4", "text": "dup\ndup\n", "step": "gopher_repetition", "reason": "duplicate_lines"}]),
        "tokenizer/train_report.json": json.dumps({
            "vocab_size": 512, "requested_vocab_size": 512, "train_docs": 3, "train_bytes": 120, "train_seconds": 0.4,
            "heldout_docs": 2, "heldout_bytes": 64, "heldout_bytes_per_token": 3.25,
            "heldout_by_language": {"en": {"docs": 1, "bytes": 40, "bytes_per_token": 3.5},
                                    "zh": {"docs": 1, "bytes": 24, "bytes_per_token": 2.75}},
            "vocab_scripts": {"Latin": 400, "Han": 100, "special": 4}}),
        "shards/index.json": json.dumps({"splits": {
            "train": [{"file": "train_000000.bin", "num_tokens": 1000, "num_docs": 3, "num_bytes": 3300}],
            "val": [{"file": "val_000000.bin", "num_tokens": 100, "num_docs": 1, "num_bytes": 330}]}}),
        "pretrain/config.yaml": "batch_size: 4\nseq_len: 32\nmax_steps: 40\nmodel:\n  n_layer: 2\n",
        # val loss and bits per byte logged as separate records of one step, and one torn line
        "pretrain/metrics.jsonl": _jsonl(_train(range(10, 41, 10), 128)[:2]) + '{"step": 30, "loss": 4.\n'
        + _jsonl(_train(range(30, 41, 10), 128) + [{"step": 40, "val_loss": 3.5, "val_ppl": 33.1},
                                                    {"step": 40, "val_bpb": 1.2345}]),
        "sft/config.yaml": "base: pretrain\nmax_steps: 20\n",
        "sft/metrics.jsonl": _jsonl([{"step": 0, "val_loss": 4.0, "val_ppl": 54.6}] + _train(range(10, 21, 10), 64)
                                    + [{"step": 20, "val_loss": 3.0, "val_ppl": 20.1}]),
        "sft/samples.txt": "### user: hi\n### reply: hello & welcome\n",
        "grpo/config.yaml": "base: sft\ntask: sort\n",
        "grpo/metrics.jsonl": _jsonl([{"step": 0, "val_accuracy": 0.25, "val_prompts": 4}]
                                     + _train(range(5, 11, 5), 32, reward=0.5, accuracy=0.5, kl=0.01)
                                     + [{"step": 10, "val_accuracy": 0.5, "val_prompts": 4}]),
        "grpo/eval/step_00000000.json": json.dumps({"step": 0, "questions": ["q"] * 4, "correct": [1, 0, 0, 0]}),
        "grpo/eval/step_00000010.json": json.dumps({"step": 10, "questions": ["q"] * 4, "correct": [1, 1, 0, 0]}),
        "samples.txt": "# samples\n--- prompt: 'ROMEO:'\nROMEO: <script>alert('x')</script> & more\n",
        "chat.txt": "you> 你好！\nassistant> 我很好。\n",
        "align.json": json.dumps({"summary": "held-out sort accuracy: 0.25 -> 0.50 after 10 GRPO steps"}),
        "eval/pretrain/results.json": _results("demo/pretrain", {
            "shakespeare-next": _mc(0.216, 0.18216716501825247, 0.2541636183073006),
            "ppl:valid.txt": {"loss": 3.4, "ppl": 30.0, "bpb": 1.5678, "tokens": 100, "bytes": 330}}),
        "eval/sft/results.json": _results("demo/sft", {
            "shakespeare-next": _mc(0.25, 0.214, 0.2898),
            "task:sort": {"n": 200, "exact_match": 0.125, "exact_match_lo": 0.085, "exact_match_hi": 0.179}}),
    }
    # fmt: on
    for name, text in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text, encoding="utf-8")
    return run


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str, str]:
    run = make_run(tmp_path_factory.mktemp("report"))
    html_path, md_path = write_report([run], run.parent / "out")
    return run, html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")


def test_html_has_every_section_the_values_and_nothing_external(built):
    _, page, _ = built
    for section in SECTIONS:
        assert f">{section}</h3>" in page, section
    assert "0.216 [0.182, 0.254]" in page and "0.250 [0.214, 0.290]" in page  # acc_norm with its 95% interval
    assert "0.125 [0.085, 0.179]" in page and "1.5678" in page  # exact match; bits per byte of a ppl task
    assert "shakespeare-next acc_norm [95%] (chance 0.25)" in page
    assert "1.2345" in page and "3.5000" in page  # val bpb and val loss from two records of one step
    assert "metrics.jsonl: 1 unreadable line(s), skipped: line 3" in page
    assert "0.250 [0.046, 0.699]" in page and "0.500 [0.150, 0.850]" in page  # grpo/eval/step_*.json
    assert "stopped (time_budget)" in page and "after 10 GRPO steps" in page
    assert "2.750" in page and "3.250" in page  # bytes per token, per language and overall
    assert "language/language_not_kept" in page and "你好" in page
    # text from the run is escaped; the page runs no script and loads nothing from outside
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page and "<script" not in page
    assert "hello &amp; welcome" in page
    assert not re.search(r"(src|href)=\"(?!data:image/png;base64,|#)", page)
    text = re.sub(r"base64,[A-Za-z0-9+/=]+", "", page)  # (base64 may spell anything)
    assert "http" not in text.lower() and "url(" not in text and "<link" not in text and "@import" not in text
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4  # the funnel and three stages' curves
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    assert "<details><summary>pretrain/config.yaml</summary>" in page and "n_layer: 2" in page
    assert "<details><summary>clean (stages.json)</summary>" in page


def test_markdown_has_the_tables_and_the_saved_images(built):
    run, _, md = built
    assert "| stage | shakespeare-next acc_norm [95%] (chance 0.25) |" in md
    assert "| pretrain | 0.216 [0.182, 0.254] |" in md
    assert "| kept | 3 | 120 |" in md  # documents and bytes of text kept (3 x 40 bytes)
    assert "| language/language_not_kept | 1 | 24 |" in md  # 8 kana/kanji x 3 bytes
    assert "&lt;script&gt;" not in md and "<script>alert" in md  # inside a code fence: shown as written
    for name in re.findall(r"\]\(report_files/([^)]+)\)", md):
        assert (run.parent / "out" / "report_files" / name).read_bytes().startswith(b"\x89PNG")
    assert "## Run demo" in md and "### Data funnel" in md


def test_the_report_is_deterministic_apart_from_its_timestamp(built, tmp_path):
    run, page, md = built
    html_path, md_path = write_report([run], tmp_path)

    def strip(text: str) -> str:
        return re.sub(r"generated \d{4}-\d\d-\d\d \d\d:\d\d UTC", "", text)

    assert strip(html_path.read_text(encoding="utf-8")) == strip(page)
    assert strip(md_path.read_text(encoding="utf-8")) == strip(md)


def test_cli_writes_into_the_run_folder_and_adds_eval_files(tmp_path, capsys):
    run = make_run(tmp_path) / "sft"  # a single training run
    for name, acc in (("base", 0.1), ("chat", 0.9)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(_results(name, {"shakespeare-next": _mc(acc, 0.05, 0.95)}))
    argv = ["report", str(run), "--title", "a <b> title", "--eval", str(tmp_path / "base" / "results.json"),
            "--eval", str(tmp_path / "chat")]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0] == str(run / "report.html")
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "<title>a &lt;b&gt; title</title>" in page and ">Run sft</h2>" in page
    assert "<td>base</td><td>0.100 [0.050, 0.950]</td>" in page and "<td>chat</td><td>0.900" in page
    assert (run / "report.md").is_file() and (run / "report_files" / "r0-curves-sft.png").is_file()


def test_a_missing_or_empty_run_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope: run folder not found" in err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no lmforge run here" in capsys.readouterr().err
    run = make_run(tmp_path)
    assert main(["report", str(run), "--eval", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: not found" in capsys.readouterr().err
    assert main(["report"]) == 2


def test_missing_and_unreadable_files_are_named_not_fatal(tmp_path):
    run = make_run(tmp_path)
    (run / "clean" / "report.json").write_text("{not json")
    (run / "tokenizer" / "train_report.json").unlink()
    (run / "sft" / "metrics.jsonl").unlink()
    (run / "eval" / "sft" / "results.json").write_text("[1, 2]")
    (run / "grpo" / "eval" / "step_00000010.json").write_text("")
    html_path, _ = write_report([run], tmp_path / "out")
    page = html_path.read_text(encoding="utf-8")
    assert "clean/report.json: unreadable: Expecting property name" in page
    assert "tokenizer/train_report.json: not found" in page
    assert "metrics.jsonl: not found" in page
    assert "eval/sft/results.json: unreadable: expected a JSON object" in page
    assert "step_00000010.json" in page and "0.216 [0.182, 0.254]" in page  # what could be read still shows


def _leaves(value, to):
    if isinstance(value, dict):
        return {k: _leaves(v, to) for k, v in value.items()}
    return [_leaves(v, to) for v in value] if isinstance(value, list) else to(value)


def _swap(value):
    """Mappings become lists and lists mappings: every file keeps its content in the wrong shape."""
    if isinstance(value, dict):
        return [_swap(v) for v in value.values()]
    return {str(i): _swap(v) for i, v in enumerate(value)} if isinstance(value, list) else value


@pytest.mark.parametrize("damage", ["strings", "floats", "shapes"])
def test_json_of_any_shape_renders(tmp_path, damage):
    """Files from an older lmforge or damaged ones: a field of another type or shape shows as "—", never a crash."""
    mutate = {"strings": lambda d: _leaves(d, lambda v: "x"), "floats": lambda d: _leaves(d, lambda v: 1.5),
              "shapes": _swap}[damage]  # fmt: skip
    run = make_run(tmp_path)
    for f in run.rglob("*.json"):
        f.write_text(json.dumps(mutate(json.loads(f.read_text()))))
    for f in run.rglob("metrics.jsonl"):  # (strings: no curves to draw, which keeps the test fast)
        lines = [json.loads(line) for line in f.read_text().splitlines() if line.endswith("}")]
        f.write_text(_jsonl([_leaves(r, lambda v: "x") if damage != "shapes" else _swap(r) for r in lines]))
    html_path, _ = write_report([run], tmp_path / "out")
    assert ">Summary</h3>" in html_path.read_text(encoding="utf-8")


def test_several_runs_one_section_each(tmp_path):
    run = make_run(tmp_path)
    html_path, _ = write_report([run / "grpo", run / "sft"], tmp_path / "two")
    page = html_path.read_text(encoding="utf-8")
    assert ">Run grpo</h2>" in page and ">Run sft</h2>" in page and "Data funnel" not in page
    assert 'id="r0-curves"' in page and 'id="r1-curves"' in page and "hello &amp; welcome" in page
    assert "<td>0</td><td>4</td><td>0.250 [0.046, 0.699]</td>" in page  # grpo/eval/step_*.json, read from grpo/


def test_read_metrics_keeps_the_last_record_of_a_step_and_merges_evals(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_jsonl([{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.5}, {"step": 20, "val_loss": 1.7},
                            {"step": 10, "loss": 1.9}, {"step": 20, "val_bpb": 0.9}, [1]]) + "\n")  # fmt: skip
    train, evals, problems = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in train] == [(10, 1.9), (20, 1.5)]
    assert evals == [{"step": 20, "val_loss": 1.7, "val_bpb": 0.9}]
    assert problems == ["metrics.jsonl: 1 unreadable line(s), skipped: line 6: not a record with a step"]


CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  document.body.dataset.decoded = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.total = images.length;
});
</script>"""


def test_headless_chromium_renders_every_section_and_decodes_every_image(built, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium binary")
    _, page, _ = built
    # The check runs in a copy: the report itself carries no script.
    (tmp_path / "page.html").write_text(page.replace("</body>", CHECK_IMAGES + "</body>"), encoding="utf-8")
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", (tmp_path / "page.html").as_uri()],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    dom = out.stdout
    assert out.returncode == 0 and "<body" in dom, out.stderr[-2000:]
    for section in SECTIONS:
        assert f">{section}</h3>" in dom, section
    decoded = re.search(r'data-decoded="(\d+)" data-total="(\d+)"', dom)
    assert decoded and decoded.group(1) == decoded.group(2) == "4", dom[:300]
