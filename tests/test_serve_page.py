"""The chat page at / in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium): it asks
for the API key the server wants, then a typed prompt streams back the answer `model.chat` gives. Skipped, with the
reason, where no browser is installed; .ci/run installs one."""

import os
import shutil
import time

import pytest

pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the test extra)")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serve_helpers import start_server, tiny_model  # noqa: E402

from phixtral.serve.engine import Engine  # noqa: E402
from phixtral.serve.limits import Limits  # noqa: E402

CHROMIUM = os.environ.get("PHIXTRAL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("PHIXTRAL_CHROMEDRIVER") or shutil.which("chromedriver")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
)  # fmt: skip
KEY = "sk-page-key"
PROMPT = "Write a function that adds two numbers."

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no headless browser: install Debian's chromium and chromium-driver (apt-get install chromium "
    "chromium-driver), or point PHIXTRAL_CHROMIUM / PHIXTRAL_CHROMEDRIVER at them",
)


@pytest.fixture(scope="module")
def served():
    model = tiny_model()
    engine = Engine(model, max_batch_size=4)
    srv, thread, port = start_server(engine, Limits(api_key=KEY))
    yield model, port
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_the_chat_page_streams_an_answer_after_the_api_key_is_given(served, browser):
    model, port = served
    expected = model.chat([{"role": "user", "content": PROMPT}], max_new_tokens=12)
    browser.get(f"http://localhost:{port}/")
    wait = WebDriverWait(browser, 60)
    status = browser.find_element(By.ID, "model")
    wait.until(lambda _: "API key" in status.text)
    key = browser.find_element(By.ID, "api_key")
    key.send_keys(KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait.until(lambda _: "tiny-phixtral" in status.text)
    for field, value in (("temperature", "0"), ("max_tokens", "12")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    # Count the page's updates of the answer: a streamed answer arrives in several pieces.
    browser.execute_script(
        "window.updates = 0; new MutationObserver(() => window.updates++)"
        ".observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});"
    )
    started = time.monotonic()
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    browser.find_element(By.ID, "send").click()
    answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant[data-state='done']"))
    text = browser.execute_script("return arguments[0].childNodes[0].textContent", answer)
    assert text == expected, (text, expected, time.monotonic() - started)
    assert "12 tokens" in answer.find_element(By.CLASS_NAME, "meta").text
    assert browser.execute_script("return window.updates") > 3
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
