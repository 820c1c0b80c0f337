"""The page in a real browser (headless Debian chromium via selenium): upload, read the result, give feedback."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path, monkeypatch):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian packages chromium, chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_AVOID_STATS", "true")  # selenium never phones home
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1400",
                f"--user-data-dir={tmp_path / 'profile'}", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_upload_in_the_page_shows_class_heatmap_and_saves_feedback(browser, live_url, oct_images, serve_dir,
                                                                   small_bundle, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from retinalens.feedback.store import FeedbackStore

    black = tmp_path / "black.png"  # a frame the quality gate refuses
    Image.new("L", (300, 200)).save(black)
    scans = [oct_images[0], oct_images[-1], black]  # real OCT B-scans from the shared data (a CNV and a NORMAL)
    browser.get(live_url + "/")
    assert "not a medical device" in browser.find_element(By.TAG_NAME, "body").text
    browser.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in scans))
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.card")) == 3)
    cards = browser.find_elements(By.CSS_SELECTOR, "article.card")
    assert [c.find_element(By.TAG_NAME, "h2").text for c in cards] == [p.name for p in scans]
    for card in cards[:2]:  # real scans: a class, unless the gate calls the scan ungradable
        passed = card.find_element(By.CSS_SELECTOR, ".gate").text == "Quality check: passed"
        label = card.find_element(By.CSS_SELECTOR, ".label").text
        assert label in small_bundle.classes if passed else label == "Not assessed"
    assert cards[2].find_element(By.CSS_SELECTOR, ".label").text == "Not assessed"
    assert cards[2].find_element(By.CSS_SELECTOR, ".gate").text.startswith("Quality check: failed")
    for card in cards:
        assert len(card.find_elements(By.CSS_SELECTOR, ".probs tr")) == len(small_bundle.classes)
    # the heat maps arrive (Grad-CAM, one at a time on the server) and are real images
    wait.until(lambda d: d.execute_script(
        "const imgs = [...document.querySelectorAll('img.heatmap')];"
        "return imgs.length === 3 && imgs.every(i => i.complete && i.naturalWidth > 0);"))
    widths = browser.execute_script("return [...document.querySelectorAll('img.heatmap')].map(i => i.naturalWidth)")
    assert all(w > 100 for w in widths)
    browser.save_screenshot(str(tmp_path / "analysis.png"))
    assert (tmp_path / "analysis.png").stat().st_size > 10_000

    # a clinician corrects the first image's label
    first = cards[0]
    predicted = first.find_element(By.CSS_SELECTOR, ".label").text
    corrected = next(c for c in small_bundle.classes if c != predicted)
    Select(first.find_element(By.TAG_NAME, "select")).select_by_value(corrected)
    button = first.find_element(By.CSS_SELECTOR, "form.feedback button")
    assert button.text == "Save correction"
    button.click()
    wait.until(lambda d: first.find_element(By.CSS_SELECTOR, ".saved").text.startswith("Saved"))
    assert first.find_element(By.CSS_SELECTOR, ".saved").text == f"Saved: corrected to {corrected}"
    browser.save_screenshot(str(tmp_path / "feedback.png"))
    with FeedbackStore(serve_dir / "feedback.db") as store:
        digest = hashlib.sha256(scans[0].read_bytes()).hexdigest()
        mine = [c for c in store.confirmed() if c.record["image_sha256"] == digest]
        assert mine and mine[-1].label == corrected

    browser.get(live_url + "/model")  # the model card page
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "not a medical device" in text and "efficientnet_lite0" in text
