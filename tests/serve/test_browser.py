"""The page in a real browser (headless Debian chromium via selenium): upload, read the result, give feedback,
by mouse and by keyboard, on a desktop and a phone-sized screen, as the accessibility tree shows it.

With RETINALENS_SCREENSHOTS=DIR (`make screenshots`) the tests also write the README's pictures there:
the page with real results (desktop and 390 px) and the HTML report, as small palette PNGs.
"""

from __future__ import annotations

import os
import hashlib
import shutil
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SHOTS = os.environ.get("RETINALENS_SCREENSHOTS")


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
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}", "--no-first-run", "--disable-extensions",
                "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def _black_frame(tmp_path: Path) -> Path:
    from PIL import Image

    black = tmp_path / "black.png"  # a frame the quality gate refuses
    Image.new("L", (300, 200)).save(black)
    return black


def _analyse(browser, url: str, images: list[Path]) -> list:
    """Open the page, choose the images, press "Analyse"; the result cards once every heat map has loaded."""
    from selenium.webdriver.common.by import By

    browser.get(url + "/")
    browser.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in images))
    assert browser.find_element(By.ID, "chosen").text.startswith(f"{len(images)} image")
    browser.find_element(By.ID, "analyse").click()
    return _results(browser, len(images))


def _results(browser, n: int) -> list:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.card")) == n)
    wait.until(lambda d: d.execute_script(  # the heat maps arrive (Grad-CAM, one at a time on the server)
        "return [...document.querySelectorAll('img.heatmap')].every(i => i.complete && i.naturalWidth > 0);"))
    return browser.find_elements(By.CSS_SELECTOR, "article.card")


def _screenshot(browser, name: str, width: int, max_height: int = 2400) -> None:
    """With RETINALENS_SCREENSHOTS: the whole page (up to max_height) at `width`, as an optimised palette PNG."""
    if not SHOTS:
        return
    from PIL import Image

    metrics = {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": False}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)  # the viewport itself, not the window
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics | {"height": min(height, max_height)})
    out = Path(SHOTS) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        browser.save_screenshot(str(out))
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    with Image.open(out) as shot:  # 128 colours lose nothing that matters in a page of text and a few heat maps
        small = shot.convert("RGB").quantize(128, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    small.save(out, optimize=True)


def test_upload_in_the_page_shows_class_heatmap_and_saves_feedback(browser, live_url, oct_images, serve_dir,
                                                                   small_bundle, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from retinalens.feedback.store import FeedbackStore

    scans = [oct_images[0], oct_images[-1], _black_frame(tmp_path)]  # real OCT B-scans (a CNV and a NORMAL)
    cards = _analyse(browser, live_url, scans)
    assert "not a medical device" in browser.find_element(By.TAG_NAME, "body").text
    assert browser.find_element(By.ID, "status").text == "3 images analysed."
    assert [c.find_element(By.TAG_NAME, "h2").text for c in cards] == [p.name for p in scans]
    graded = 0
    for card in cards:
        if card.find_elements(By.CSS_SELECTOR, ".gate.ok"):  # a class, its probabilities and its heat map
            graded += 1
            assert card.find_element(By.CSS_SELECTOR, ".label").text in small_bundle.classes
            bars = card.find_elements(By.CSS_SELECTOR, ".probs [role=meter]")
            assert len(bars) == len(small_bundle.classes)
            values = [float(b.get_attribute("aria-valuenow")) for b in bars]
            assert values == sorted(values, reverse=True) and sum(values) == pytest.approx(100, abs=0.5)
            assert card.find_element(By.CSS_SELECTOR, "img.heatmap").get_property("naturalWidth") > 100
        else:  # ungradable: the reason, and nothing that reads as a result
            text = card.find_element(By.CSS_SELECTOR, ".label").text
            assert text.startswith("Ungradable: ") and len(text) > len("Ungradable: ")
            for absent in (".probs", "[role=meter]", ".referral", "img.heatmap"):
                assert not card.find_elements(By.CSS_SELECTOR, absent), absent
            assert "%" not in card.text
    assert not cards[2].find_elements(By.CSS_SELECTOR, ".gate.ok")  # the black frame is refused
    assert graded >= 1  # at least one real scan passes the gate, or this test shows nothing
    _screenshot(browser, "web-page-desktop.png", 1100)

    # a clinician corrects the first graded image's label
    first = next(c for c in cards if c.find_elements(By.CSS_SELECTOR, ".gate.ok"))
    index = cards.index(first)
    predicted = first.find_element(By.CSS_SELECTOR, ".label").text
    corrected = next(c for c in small_bundle.classes if c != predicted)
    Select(first.find_element(By.TAG_NAME, "select")).select_by_value(corrected)
    button = first.find_element(By.CSS_SELECTOR, "form.feedback button")
    assert button.text == "Save correction"
    button.click()
    WebDriverWait(browser, 60).until(lambda d: first.find_element(By.CSS_SELECTOR, ".saved").text.startswith("Saved"))
    assert first.find_element(By.CSS_SELECTOR, ".saved").text == f"Saved: corrected to {corrected}"
    with FeedbackStore(serve_dir / "feedback.db") as store:
        digest = hashlib.sha256(scans[index].read_bytes()).hexdigest()
        mine = [c for c in store.confirmed() if c.record["image_sha256"] == digest]
        assert mine and mine[-1].label == corrected

    # the ungradable image has no label to confirm: the clinician must choose one
    refused = cards[2]
    assert Select(refused.find_element(By.TAG_NAME, "select")).first_selected_option.get_attribute("value") == ""
    refused.find_element(By.CSS_SELECTOR, "form.feedback button").click()
    assert refused.find_element(By.CSS_SELECTOR, ".saved").text == "Choose a label first."

    browser.get(live_url + "/model")  # the model card page
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "not a medical device" in text and "efficientnet_lite0" in text


def _ax_nodes(browser) -> list[tuple[str, str, dict]]:
    """Chromium's accessibility tree: (role, name, properties) of every node a screen reader sees."""
    tree = browser.execute_cdp_cmd("Accessibility.getFullAXTree", {})["nodes"]
    return [(n.get("role", {}).get("value", ""), n.get("name", {}).get("value", ""),
             {p["name"]: p["value"].get("value") for p in n.get("properties", [])})
            for n in tree if not n.get("ignored")]


def test_keyboard_alone_uploads_and_gives_feedback_with_labels_for_screen_readers(browser, live_url, demo_scans,
                                                                                small_bundle):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(live_url + "/")
    # the picker opens from the drop zone by Enter and by Space (counted: headless chromium shows no dialog)
    browser.execute_script("window.opened = 0; document.getElementById('file-input')"
                           ".addEventListener('click', (e) => { window.opened++; e.preventDefault(); });")

    def tab() -> dict:
        ActionChains(browser).send_keys(Keys.TAB).perform()
        return browser.execute_script(
            "const a = document.activeElement, s = getComputedStyle(a);"
            "return {id: a.id, tag: a.tagName, text: a.textContent.trim().slice(0, 40),"
            "        outline: s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) >= 2};")

    order = [tab() for _ in range(6)]
    assert [o["text"] for o in order[:3]] == ["Analyse", "Model card", "API"]  # the header's links
    assert [o["id"] for o in order[3:]] == ["drop", "as-volume", "analyse"]  # upload, "one volume", submit
    assert all(o["outline"] for o in order)  # focus is visible on every stop
    drop = browser.find_element(By.ID, "drop")
    drop.send_keys(Keys.ENTER)
    drop.send_keys(Keys.SPACE)
    assert browser.execute_script("return window.opened") == 2

    scan = demo_scans["CNV"]
    browser.find_element(By.ID, "file-input").send_keys(str(scan))  # what the picker would give
    browser.find_element(By.ID, "analyse").send_keys(Keys.ENTER)  # submit by keyboard
    [card] = _results(browser, 1)
    assert card.find_elements(By.CSS_SELECTOR, ".gate.ok"), "the demo CNV scan should pass the quality gate"
    assert browser.switch_to.active_element.get_attribute("id") == "analyse"
    select = tab()
    assert select["tag"] == "SELECT" and select["outline"]  # from submit, the next stop is the feedback
    predicted = card.find_element(By.CSS_SELECTOR, ".label").text
    ActionChains(browser).send_keys(Keys.DOWN if predicted != small_bundle.classes[-1] else Keys.UP).perform()
    chosen = card.find_element(By.TAG_NAME, "select").get_attribute("value")
    assert chosen != predicted
    button = tab()
    assert button["tag"] == "BUTTON" and button["text"] == "Save correction"
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    WebDriverWait(browser, 60).until(lambda d: card.find_element(By.CSS_SELECTOR, ".saved").text.startswith("Saved"))
    assert card.find_element(By.CSS_SELECTOR, ".saved").text == f"Saved: corrected to {chosen}"

    nodes = _ax_nodes(browser)
    named = {(role, name) for role, name, _ in nodes}
    assert ("button", "Choose images") in named  # the drop zone
    assert any(name == "Retinal images to analyse" for _, name, _ in nodes)  # the file input
    assert ("button", "Analyse") in named and ("button", "Save correction") in named
    assert ("combobox", "Clinician's label:") in named
    results = [props for role, name, props in nodes if role == "region" and name == "Results"]
    assert results and results[0].get("live") == "polite"
    meters = {name: props for role, name, props in nodes if role == "meter"}
    assert set(meters) == {f"{c} probability" for c in small_bundle.classes}
    assert all(props.get("valuetext", "").endswith("%") for props in meters.values())


def test_phone_sized_screen_has_no_horizontal_scrolling(browser, live_url, oct_images, tmp_path):
    from selenium.webdriver.common.by import By

    browser.set_window_size(390, 844)
    assert browser.execute_script("return window.innerWidth") == 390
    cards = _analyse(browser, live_url, [oct_images[0], _black_frame(tmp_path)])  # a real CNV B-scan
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
    for card in cards:  # every card fits the screen, its text at a readable size
        box = card.rect
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390
        size = browser.execute_script("return parseFloat(getComputedStyle(arguments[0]).fontSize)",
                                      card.find_element(By.CSS_SELECTOR, ".label"))
        assert size >= 16
    image = cards[0].find_elements(By.CSS_SELECTOR, "img.heatmap")
    assert not image or image[0].rect["width"] >= 300  # the heat map uses the width, one column
    _screenshot(browser, "web-page-390px.png", 390, max_height=2000)
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 390


@pytest.mark.skipif(not SHOTS, reason="writes the README's picture of the HTML report: set RETINALENS_SCREENSHOTS=DIR")
def test_report_screenshot(browser, small_bundle, small_dataset, feature_cache, tmp_path):
    """The HTML report of the test bundle on its test scans, as `evaluate --report` writes it (the same bytes as
    `retinalens report`: tests/evaluate/test_report.py checks that, and the report's content)."""
    from retinalens.evaluate.run import evaluate_bundle

    out = tmp_path / "report.html"
    evaluate_bundle(small_bundle, small_dataset, cache=feature_cache, n_boot=200, progress=False, report_path=out)
    browser.get(out.resolve().as_uri())
    _screenshot(browser, "report.png", 1100, max_height=1600)
    assert Path(SHOTS, "report.png").stat().st_size > 10_000


CSP = b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:"


def test_page_works_under_a_strict_content_security_policy(browser, small_bundle, demo_scans, tmp_path):
    """The page, served with a policy that forbids inline scripts and styles, still analyses and nothing is blocked."""
    from retinalens.serve.app import create_app
    from retinalens.serve.server import running_server
    from retinalens.serve.service import ServeConfig

    cfg = ServeConfig(bundle=small_bundle.path, port=0, db=str(tmp_path / "feedback.db"), log_level="warning")
    app = create_app(cfg)

    async def with_policy(scope, receive, send):  # the header the hardened server sends, on every response
        async def send_with_policy(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"content-security-policy", CSP)]
            await send(message)

        await app(scope, receive, send_with_policy)

    with running_server(cfg, with_policy) as url:
        [card] = _analyse(browser, url, [demo_scans["NORMAL"]])  # page.js ran: it chose, sent and showed
        blocked = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
        assert not blocked, blocked
        assert browser.execute_script(  # the style sheet applied: the card is laid out by style.css
            "return getComputedStyle(document.querySelector('article.card')).display") == "grid"
        assert card.find_element("css selector", "h2").text == demo_scans["NORMAL"].name
        widths = [bar.rect["width"] for bar in card.find_elements("css selector", "[role=meter]")]
        assert not widths or max(widths) > 10  # bar widths set through the CSSOM, which the policy allows


def test_a_volume_of_b_scans_is_answered_and_scrolled_by_keyboard(browser, live_url, oct_images):
    """Several B-scans sent as one volume: the eye-level answer, and the slices gone through with the arrow keys."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(live_url + "/")
    browser.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in oct_images[:4]))
    browser.find_element(By.ID, "as-volume").click()
    browser.find_element(By.ID, "analyse").click()
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "article.volume"))
    card = browser.find_element(By.CSS_SELECTOR, "article.volume")
    assert card.find_element(By.TAG_NAME, "h2").text == "OCT volume of 4 B-scans"
    assert "4 of 4 B-scans gradable" in card.text or "Ungradable volume" in card.text
    slider = card.find_element(By.CSS_SELECTOR, "input[type=range]")
    caption = card.find_element(By.CSS_SELECTOR, ".slice-caption")
    start = int(slider.get_attribute("value"))
    assert caption.text.startswith(f"B-scan {start} of 4")
    slider.send_keys(Keys.HOME)
    assert slider.get_attribute("value") == "1" and caption.text.startswith("B-scan 1 of 4")
    slider.send_keys(Keys.ARROW_RIGHT)
    assert caption.text.startswith("B-scan 2 of 4") and oct_images[1].name in caption.text  # natural name order
    image = card.find_element(By.CSS_SELECTOR, "img.slice")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image))
    assert image.get_attribute("src").endswith("/image") and image.get_attribute("alt") == "B-scan 2"
    card.find_element(By.CSS_SELECTOR, "input[type=checkbox]").send_keys(Keys.SPACE)  # the heat map, by keyboard
    assert image.get_attribute("src").endswith("/heatmap.png")
    blocked = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not blocked, blocked


def test_a_multi_frame_dicom_is_shown_as_a_volume_without_the_box(browser, live_url, oct_images, tmp_path):
    """A multi-frame DICOM file (real B-scans as frames) and a JPEG, the "one OCT volume" box left unticked:
    the JPEG gets its result card, the DICOM file a volume card whose viewer steps through its frames."""
    pytest.importorskip("pydicom", reason="DICOM needs the 'dicom' extra")
    import dicom_files as F
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    opt = F.save(F.build(F.volume(oct_images[:3])[:, :320, :320], sop_class=F.OPT), tmp_path / "IM0001.dcm")
    browser.get(live_url + "/")
    browser.find_element(By.ID, "file-input").send_keys(f"{opt}\n{oct_images[3]}")
    assert not browser.find_element(By.ID, "as-volume").is_selected()
    browser.find_element(By.ID, "analyse").click()
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.card")) == 2)
    card = browser.find_element(By.CSS_SELECTOR, "article.volume")
    assert card.find_element(By.TAG_NAME, "h2").text == "OCT volume of 3 B-scans (IM0001.dcm)"
    assert "3 of 3 B-scans gradable" in card.text or "Ungradable volume" in card.text
    assert browser.find_element(By.ID, "status").text == "1 image analysed, and 1 OCT volume."
    slider = card.find_element(By.CSS_SELECTOR, "input[type=range]")
    slider.send_keys(Keys.END)
    assert card.find_element(By.CSS_SELECTOR, ".slice-caption").text.startswith("B-scan 3 of 3")
    assert "IM0001.dcm#frame 3" in card.find_element(By.CSS_SELECTOR, ".slice-caption").text
    image = card.find_element(By.CSS_SELECTOR, "img.slice")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth === 320", image))
    other = [c for c in browser.find_elements(By.CSS_SELECTOR, "article.card") if c != card]
    assert other[0].find_element(By.TAG_NAME, "h2").text == oct_images[3].name
