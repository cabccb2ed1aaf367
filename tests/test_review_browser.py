"""The review page in a real browser: Debian's chromium, headless, driven by selenium through
chromium-driver (both installed by .ci/run), against the app served by uvicorn over PostgreSQL."""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.fixtures.postgres import admin_url, fresh_database
from tests.fixtures.review import TOKENS, RunningApp, photo_records, review_app, write_records

pytestmark = pytest.mark.slow

# the README's screenshot (docs/review.png) is this test's: REVIEW_SCREENSHOT=docs/review.png keeps it there
SCREENSHOT_ENV = "REVIEW_SCREENSHOT"


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        # fail, never skip: a browser test that silently vanishes proves nothing
        pytest.fail(
            "chromium and chromium-driver are not installed: apt-get install chromium chromium-driver (.ci/run does)"
        )
    return browser, driver


@pytest.fixture
def browsers() -> Iterator[list[WebDriver]]:
    opened: list[WebDriver] = []
    yield opened
    for driver in opened:
        driver.quit()


def open_browser(opened: list[WebDriver]) -> WebDriver:
    browser, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    opened.append(driver)
    return driver


@pytest.fixture
def running(tmp_path: Path) -> Iterator[RunningApp]:
    with fresh_database(admin_url()) as sink:
        records = photo_records(tmp_path / "photos", flagged=10, unflagged=2)
        write_records(sink, records)
        with review_app(sink, audit_rate=0.0, page_size=5) as app:
            yield app


def log_in(driver: WebDriver, app: RunningApp, reviewer: str) -> None:
    driver.get(app.url + "/")
    WebDriverWait(driver, 20).until(lambda d: "/login" in d.current_url)
    driver.find_element(By.ID, "token").send_keys(TOKENS[reviewer])
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.ID, "grid"))


def cards(driver: WebDriver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, ".card")


def press(driver: WebDriver, key: str) -> None:
    webdriver.ActionChains(driver).send_keys(key).perform()


def decided(driver: WebDriver) -> list[str]:
    return [card.get_attribute("data-decision") or "" for card in cards(driver)]


def rows(sink: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(sink) as conn:
        return conn.execute("SELECT uri, decision, reviewer FROM imagemill_reviews ORDER BY id").fetchall()


def test_a_reviewer_decides_three_items_with_the_keyboard_and_undoes_one(
    running: RunningApp, browsers: list[WebDriver], tmp_path: Path
) -> None:
    driver = open_browser(browsers)
    log_in(driver, running, "alice")
    shown = cards(driver)
    assert len(shown) == 5
    uris = [card.get_attribute("data-uri") for card in shown]
    # flagged thumbnails start blurred; space reveals the focused one, and hides it again
    assert "blurred" in shown[0].get_attribute("class")
    press(driver, " ")
    assert "blurred" not in cards(driver)[0].get_attribute("class")
    WebDriverWait(driver, 20).until(
        lambda d: d.execute_script("return document.querySelector('.card img').naturalWidth") > 0
    )
    screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "review.png")
    assert driver.save_screenshot(str(screenshot)) and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    press(driver, " ")
    assert "blurred" in cards(driver)[0].get_attribute("class")

    press(driver, "a")  # approve the first; focus moves on
    WebDriverWait(driver, 20).until(lambda d: decided(d)[0] == "approve")
    press(driver, "r")
    WebDriverWait(driver, 20).until(lambda d: decided(d)[1] == "reject")
    press(driver, "\ue014")  # arrow right: skip the third
    press(driver, "e")
    WebDriverWait(driver, 20).until(lambda d: decided(d)[3] == "escalate")
    assert decided(driver) == ["approve", "reject", "", "escalate", ""]
    assert driver.find_element(By.ID, "count-mine").text == "3"

    press(driver, "u")  # undo the last decision: the escalation
    WebDriverWait(driver, 20).until(lambda d: decided(d)[3] == "")
    assert driver.find_element(By.ID, "count-mine").text == "2"
    assert driver.find_element(By.ID, "count-left").text == "8"

    assert rows(running.sink) == [
        (uris[0], "approve", "alice"),
        (uris[1], "reject", "alice"),
        (uris[3], "escalate", "alice"),
        (uris[3], "undo", "alice"),
    ]
    # a reload shows the undecided items still claimed by alice, the undone one among them
    driver.refresh()
    WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.ID, "grid"))
    again = [card.get_attribute("data-uri") for card in cards(driver)]
    assert uris[3] in again and uris[0] not in again and uris[1] not in again


def test_two_reviewers_in_two_browsers_never_see_the_same_item(running: RunningApp, browsers: list[WebDriver]) -> None:
    alice, bob = open_browser(browsers), open_browser(browsers)
    log_in(alice, running, "alice")
    log_in(bob, running, "bob")
    seen_by_alice = {card.get_attribute("data-uri") for card in cards(alice)}
    seen_by_bob = {card.get_attribute("data-uri") for card in cards(bob)}
    assert len(seen_by_alice) == 5 and len(seen_by_bob) == 5
    assert not seen_by_alice & seen_by_bob
    # reloading keeps each reviewer's own items; the queue has no third batch for bob to take
    bob.refresh()
    WebDriverWait(bob, 20).until(lambda d: d.find_elements(By.ID, "grid"))
    assert {card.get_attribute("data-uri") for card in cards(bob)} == seen_by_bob
    press(alice, "a")
    WebDriverWait(alice, 20).until(lambda d: decided(d)[0] == "approve")
    assert rows(running.sink)[0][2] == "alice"
