"""The page in a real browser: headless Chromium uploads an example slice and sees the answer appear.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install -y chromium chromium-driver``);
skips naming the one that is missing (the browser or its driver). With ``TUMOR_XAI_SCREENSHOT=1`` the final page is
saved to ``assets/screenshot.png`` (the README's picture); otherwise to the test's tmp folder.
"""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import CLASSES, EXAMPLES, REPO, browser_missing

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if reason := browser_missing(CHROMIUM, CHROMEDRIVER):
    pytest.skip(reason, allow_module_level=True)

CHROME_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1200",
]


@pytest.fixture(scope="module")
def server(app_server) -> str:
    return app_server[0]  # the session's server, shared with test_app.py (conftest.app_server)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_upload_shows_the_label_and_the_overlay(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(server)
    upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#image-input input[type=file]")))
    example = EXAMPLES / "glioma_1.jpg"
    upload.send_keys(str(example))

    # The label shows one of the weights' classes; the overlay is a real, decoded image.
    label = wait.until(lambda d: _text_with_class(d.find_element(By.ID, "label").text))
    overlay = wait.until(lambda d: _loaded_image(d, "#overlay img"))
    original = wait.until(lambda d: _loaded_image(d, "#original img"))
    assert browser.execute_script("return arguments[0].naturalWidth", overlay) == 224
    assert browser.execute_script("return arguments[0].naturalWidth", original) == 224
    assert "Most likely class" in browser.find_element(By.ID, "summary").text
    if (REPO / "weights" / "model.json").is_file():
        assert label == "glioma"
    assert "Traceback" not in browser.page_source
    # All the tabs sit in one tab bar (a stray block between tabs once split it and hid two).
    bars = [
        [t.text.strip() for t in bar.find_elements(By.CSS_SELECTOR, "[role=tab]")]
        for bar in browser.find_elements(By.CSS_SELECTOR, "[role=tablist]")
    ]
    assert bars == [["Classify one slice", "Batch", "Scan", "About the model and data"]], bars
    # Everything the page loaded (scripts, fonts, images) came from the app itself.
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and not [u for u in urls if not u.startswith((server, "data:", "blob:"))]

    shot = (
        REPO / "assets" / "screenshot.png"
        if os.environ.get("TUMOR_XAI_SCREENSHOT") == "1"
        else tmp_path / "screenshot.png"
    )
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def _text_with_class(text: str) -> str | bool:
    """The first class name in the label's text, or False while none is shown yet."""
    lines = [line.strip() for line in text.splitlines()]
    return next((line for line in lines if line in CLASSES), False)


def _loaded_image(driver, css: str):
    for img in driver.find_elements("css selector", css):
        if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img):
            return img
    return False


def test_scan_tab_shows_the_curve_the_slices_and_the_top_slices(server, browser, tmp_path):
    """A NIfTI volume dropped on the Scan tab: summary, curve, a slider over every slice, the top slices, the CSV."""
    from conftest import example_slices, make_nifti
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    scan = make_nifti(tmp_path / "scan.nii.gz", example_slices(6, size=224, marker=False))
    wait = WebDriverWait(browser, 90)
    browser.get(server)
    tab = wait.until(
        lambda d: next((t for t in d.find_elements(By.CSS_SELECTOR, "[role=tab]") if t.text == "Scan"), False)
    )
    tab.click()
    upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#scan-input input[type=file]")))
    upload.send_keys(str(scan))

    summary = wait.until(
        lambda d: "axial slices" in d.find_element(By.ID, "scan-summary").text and d.find_element(By.ID, "scan-summary")
    )
    assert "6 axial slices" in summary.text
    wait.until(lambda d: _loaded_image(d, "#scan-curve img"))
    first = wait.until(lambda d: _loaded_image(d, "#scan-slice img"))
    assert browser.execute_script("return arguments[0].naturalWidth", first) == 224
    gallery = wait.until(lambda d: _loaded_image(d, "#scan-gallery img"))
    assert gallery is not None
    caption = browser.find_element(By.ID, "scan-caption").text
    assert caption.startswith("slice ")
    # Browse: the slider's number box moves to another slice, and its caption follows.
    box = browser.find_element(By.CSS_SELECTOR, "#scan-slider input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    target = 0 if not caption.startswith("slice 0 ") else 5
    box.send_keys(str(target), Keys.ENTER)
    wait.until(lambda d: d.find_element(By.ID, "scan-caption").text.startswith(f"slice {target} ("))
    assert wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#scan-csv a"))
    assert "Traceback" not in browser.page_source

    shot = (
        REPO / "assets" / "scan_screenshot.png"
        if os.environ.get("TUMOR_XAI_SCREENSHOT") == "1"
        else tmp_path / "scan_screenshot.png"
    )
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def _open_tab(browser, name: str) -> None:
    from selenium.webdriver.common.by import By

    tab = next(t for t in browser.find_elements(By.CSS_SELECTOR, "[role=tab]") if t.text.strip() == name)
    tab.click()


def test_a_refused_image_gets_no_verdict_on_the_page(server, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    blank = tmp_path / "blank.png"
    Image.new("L", (256, 256), 128).save(blank)
    wait = WebDriverWait(browser, 60)
    browser.get(server)
    upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#image-input input[type=file]")))
    upload.send_keys(str(blank))
    summary = wait.until(
        lambda d: "Not assessed" in d.find_element(By.ID, "summary").text and d.find_element(By.ID, "summary")
    )
    assert "Not assessed" in browser.find_element(By.ID, "label").text
    text = summary.text
    assert "Tumour probability" not in text and "Screening flag" not in text and "Most likely class" not in text
    browser.find_element(By.XPATH, "//*[normalize-space()='Details (as the API returns them)']").click()
    details = wait.until(EC.visibility_of_element_located((By.ID, "details")))
    wait.until(lambda d: "in_distribution" in details.text)
    compact = "".join(details.text.split())
    for key in ("label", *(f"p_{c}" for c in CLASSES), "tumor_probability", "screening_positive", "target"):
        assert f'"{key}":null' in compact, (key, compact)
    assert '"in_distribution":false' in compact and "blank" in compact


def test_batch_rows_say_why_where_the_eye_reaches(server, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    broken, blank = tmp_path / "broken.png", tmp_path / "blank.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.new("L", (256, 256), 128).save(blank)
    wait = WebDriverWait(browser, 60)
    browser.get(server)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "[role=tab]")))
    _open_tab(browser, "Batch")
    table = wait.until(EC.visibility_of_element_located((By.ID, "batch-table")))
    headers = [h.text.strip() for h in table.find_elements(By.CSS_SELECTOR, "thead th") if h.text.strip()]
    assert headers[:2] == ["file", "result"] and "1" not in headers, headers
    upload = browser.find_element(By.CSS_SELECTOR, "#batch-input input[type=file]")
    upload.send_keys("\n".join(str(p) for p in (EXAMPLES / "glioma_1.jpg", broken, blank)))
    browser.find_element(By.XPATH, "//button[normalize-space()='Classify all']").click()
    wait.until(lambda d: "unreadable" in d.find_element(By.ID, "batch-table").text)
    width = browser.execute_script("return window.innerWidth")
    cells = {}
    for word in ("unreadable: ", "not assessed: "):
        found = browser.find_elements(
            By.XPATH, f"//*[@id='batch-table']//*[starts-with(normalize-space(text()), '{word}')]"
        )
        shown = [cell for cell in found if cell.is_displayed() and cell.text.strip()]
        if shown:
            cells[word] = shown[0]
    assert set(cells) == {"unreadable: ", "not assessed: "}, browser.find_element(By.ID, "batch-table").text
    for cell in cells.values():  # the reason is on screen at 1400 px, not scrolled off to the right
        right = browser.execute_script("return arguments[0].getBoundingClientRect().right", cell)
        assert right <= width, (cell.text, right, width)
    assert "broken.png" in cells["unreadable: "].text and "blank" in cells["not assessed: "].text


def test_about_tab_shows_whole_plots_and_prose(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(server)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "[role=tab]")))
    _open_tab(browser, "About the model and data")
    wait.until(EC.visibility_of_element_located((By.ID, "about")))
    # Every table cell keeps its words whole: a number is never split over two lines ("131 / 1").
    split = browser.execute_script("""
        const out = [];
        for (const td of document.querySelectorAll('#about td')) {
            if (!/^[0-9.,]+$/.test(td.textContent.trim())) continue;
            const r = document.createRange(); r.selectNodeContents(td);
            const lines = new Set([...r.getClientRects()].map(x => Math.round(x.top)));
            if (lines.size > 1) out.push(td.textContent.trim());
        }
        return out;""")
    assert split == [], split
    # Inline code stays inline: a sentence is not split around a block of code.
    displays = browser.execute_script(
        "return [...document.querySelectorAll('#about p code')].map(c => getComputedStyle(c).display)"
    )
    assert displays and set(displays) == {"inline"}, set(displays)
    # The dataset plots are shown whole, not cropped to squares.
    fits = browser.execute_script(
        "return [...document.querySelectorAll('#dataset-plots img')].map(i => getComputedStyle(i).objectFit)"
    )
    assert fits and set(fits) == {"contain"}, fits
