"""The report's feature browser in a real headless Chromium: search by id, by LAYER:ID and by token."""

from __future__ import annotations

import pytest

from conftest import ARTIFACTS, run_cli
from saescope.api.store import FeatureStore
from saescope.apps.report.page import build_report


@pytest.fixture(scope="module")
def report(tiny_sae_dir, corpus_file, tmp_path_factory):
    store_dir = tiny_sae_dir / "features"
    if not (store_dir / "store.json").exists():
        code, _, err = run_cli("features", "build", "--sae", str(tiny_sae_dir), "--data", str(corpus_file), "--max-tokens", "2048",
                               "--ctx-len", "32", "--batch-size", "4")
        assert code == 0, err
    code, _, err = run_cli("inspect", "--sae", str(tiny_sae_dir), "--texts", "Weng earns $12 an hour for babysitting", "--top", "3")
    assert code == 0, err
    return build_report(tiny_sae_dir, tmp_path_factory.mktemp("report") / "report.html"), FeatureStore(store_dir)


def test_browser_shows_a_feature_searched_by_id_and_by_token(page, report):
    path, store = report
    freq = store.frequencies(1)
    f = int(freq.argmax())
    info = store.feature(1, f, contexts=4)
    page.goto(path.as_uri())
    page.select_option("#sfb-layer", "1")
    page.fill("#sfb-q", str(f))
    page.click("#sfb-go")
    assert page.inner_text("#sfb-title") == f"Layer 1 feature {f}"
    card = page.inner_text("#sfb-card")
    assert f"{100 * info['frequency']:.3g}%" in card
    marks = page.locator("#sfb-card mark").all_inner_texts()
    assert marks == [c["tokens"][c["mark"]] for c in info["contexts"]]  # the peak token of each context, highlighted
    assert page.locator("#sfb-card svg.sfb-hist rect").count() == sum(1 for v in info["hist"] if v)
    # LAYER:ID jumps layers; an id that does not exist says so
    page.fill("#sfb-q", "2:63")
    page.click("#sfb-go")
    assert "Layer 2" in page.inner_text("#sfb-card")
    page.fill("#sfb-q", "5000")
    page.press("#sfb-q", "Enter")
    assert "No feature 5000: layer 2 has features 0..63" in page.inner_text("#sfb-card")
    # by token: the marked token of the first context of feature f, searched in layer 1
    token = info["contexts"][0]["tokens"][info["contexts"][0]["mark"]].strip()
    page.select_option("#sfb-layer", "1")
    page.fill("#sfb-q", token)
    page.click("#sfb-go")
    hits = page.locator("#sfb-results a.sfb-hit").all_inner_texts()
    assert str(f) in hits
    # the inspect section's feature links open the card
    link = page.locator("h2:has-text('Inspected texts') ~ p a[data-f]").first
    target = link.get_attribute("data-f")
    link.click()
    assert page.inner_text("#sfb-title").endswith(f"feature {target}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "feature-browser.png"), full_page=True)
