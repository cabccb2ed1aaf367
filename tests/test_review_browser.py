"""The review page in a real browser: Debian's chromium, headless, driven by selenium through
chromium-driver (both installed by .ci/run), against the app served by uvicorn over PostgreSQL.

Few tests, each driving many controls: a browser costs seconds to start. What the page shows is
checked as the browser computes it (styles, transforms), never by a class name alone.
"""

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.fixtures.postgres import admin_url, fresh_database
from tests.fixtures.review import TOKENS, RunningApp, photo_records, review_app, write_records

pytestmark = pytest.mark.slow

# the README's screenshot (docs/review.png) is this test's: REVIEW_SCREENSHOT=docs/review.png keeps it there
SCREENSHOT_ENV = "REVIEW_SCREENSHOT"
REASONS = ("nudity", "violence", "spam")


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
def sink(tmp_path: Path) -> Iterator[str]:
    with fresh_database(admin_url()) as url:
        write_records(url, photo_records(tmp_path / "photos", flagged=10, unflagged=2))
        yield url


def wait(driver: WebDriver, condition: Any, seconds: float = 20) -> Any:
    return WebDriverWait(driver, seconds).until(condition)


def log_in(driver: WebDriver, app: RunningApp, reviewer: str) -> None:
    driver.get(app.url + "/")
    wait(driver, lambda d: "/login" in d.current_url)
    driver.find_element(By.ID, "reviewer").send_keys(reviewer)
    driver.find_element(By.ID, "token").send_keys(TOKENS[reviewer])
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait(driver, lambda d: d.find_elements(By.ID, "grid"))


def cards(driver: WebDriver) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, ".card")


def press(driver: WebDriver, key: str) -> None:
    webdriver.ActionChains(driver).send_keys(key).perform()


def decided(driver: WebDriver) -> list[str]:
    return [card.get_attribute("data-decision") or "" for card in cards(driver)]


def image_filter(driver: WebDriver, index: int) -> str:
    """The filter the browser applies to a card's thumbnail, as computed."""
    return driver.execute_script(
        "return getComputedStyle(document.querySelectorAll('.card img')[arguments[0]]).filter", index
    )


def status(driver: WebDriver) -> str:
    return driver.find_element(By.ID, "status").text


def rows(sink: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(sink) as conn:
        return conn.execute(
            "SELECT uri, decision, reviewer, note, reason FROM imagemill_reviews ORDER BY id"
        ).fetchall()


def live_claims(sink: str, reviewer: str) -> dict[str, Any]:
    """uri -> end of the lease of the reviewer's live claims (and the database's clock under "now")."""
    with psycopg.connect(sink) as conn:
        found = dict(
            conn.execute(
                "SELECT uri, expires_at FROM imagemill_review_claims WHERE reviewer = %s AND expires_at > now()",
                (reviewer,),
            ).fetchall()
        )
        found["now"] = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
    return found


def test_a_reviewer_works_a_page_with_its_keys_and_controls(
    sink: str, browsers: list[WebDriver], tmp_path: Path
) -> None:
    with review_app(sink, audit_rate=0.0, page_size=5, reasons=REASONS) as app:
        driver = open_browser(browsers)
        log_in(driver, app, "alice")
        shown = cards(driver)
        assert len(shown) == 5
        uris = [card.get_attribute("data-uri") for card in shown]
        # each thresholded label with its score and threshold, three significant digits; crossed ones marked
        first_label = shown[0].find_element(By.CSS_SELECTOR, ".labels tr")
        assert first_label.get_attribute("class") == "crossed"
        assert first_label.text.split() == ["nsfw", "0.990", "≥", "0.500"]

        # a blurred image is blurred as the browser draws it, and cannot be approved or rejected unseen
        assert "blur(22px)" in image_filter(driver, 0)
        press(driver, "a")
        wait(driver, lambda d: "Reveal" in status(d))
        assert rows(sink) == [] and decided(driver)[0] == ""
        press(driver, " ")
        wait(driver, lambda d: image_filter(d, 0) == "none")
        wait(driver, lambda d: d.execute_script("return document.querySelector('.card img').naturalWidth") > 0)
        screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "review.png")
        assert driver.save_screenshot(str(screenshot)) and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # grayscale and blur-all, for the whole page
        # (styles are read once their transition has ended: the browser reports the value in between)
        press(driver, "g")
        wait(driver, lambda d: "grayscale(1)" in image_filter(d, 0))
        press(driver, "g")
        press(driver, "b")
        wait(driver, lambda d: "blur(22px)" in image_filter(d, 0) and "blur(22px)" in image_filter(d, 4))
        press(driver, "b")
        wait(driver, lambda d: image_filter(d, 0) == "none")

        # the full-size view: Enter opens it, + and - zoom, 0 fits, a click zooms, Esc closes
        press(driver, "\ue007")
        viewer = driver.find_element(By.ID, "viewer")
        wait(driver, lambda d: viewer.is_displayed())
        wait(driver, lambda d: d.execute_script("return document.getElementById('viewer-img').naturalWidth") == 320)

        def scale() -> str:
            return driver.execute_script("return getComputedStyle(document.getElementById('viewer-img')).transform")

        press(driver, "+")
        wait(driver, lambda d: scale() == "matrix(1.5, 0, 0, 1.5, 0, 0)")
        press(driver, "-")
        press(driver, "0")
        wait(driver, lambda d: scale() == "matrix(1, 0, 0, 1, 0, 0)")
        driver.find_element(By.ID, "viewer-img").click()
        wait(driver, lambda d: scale() == "matrix(2, 0, 0, 2, 0, 0)")
        press(driver, "\ue00c")  # Escape
        wait(driver, lambda d: not viewer.is_displayed())

        # a note (n) and a reason (digits), both stored with the decision
        press(driver, "n")
        assert driver.switch_to.active_element.get_attribute("class") == "note"
        driver.switch_to.active_element.send_keys("looks fine to me")
        press(driver, "\ue00c")
        press(driver, "2")
        assert Select(shown[0].find_element(By.CSS_SELECTOR, "select.reason-code")).first_selected_option.text.endswith(
            "violence"
        )
        press(driver, "a")  # approve the first; focus moves on
        wait(driver, lambda d: decided(d)[0] == "approve")
        press(driver, " ")
        press(driver, "r")
        wait(driver, lambda d: decided(d)[1] == "reject")
        press(driver, "s")  # skip the third: it goes back to the queue at once
        wait(driver, lambda d: cards(d)[2].get_attribute("data-skipped") == "1")
        assert uris[2] not in live_claims(sink, "alice")
        press(driver, "e")  # escalating needs no reveal
        wait(driver, lambda d: decided(d)[3] == "escalate")
        assert driver.find_element(By.ID, "count-mine").text == "3"
        press(driver, "u")  # undo the last decision: the escalation
        wait(driver, lambda d: decided(d)[3] == "")
        assert driver.find_element(By.ID, "count-mine").text == "2"
        # with the mouse: a click on the image opens (and so reveals) it, then the button decides
        shown[3].find_element(By.CSS_SELECTOR, "img").click()
        wait(driver, lambda d: viewer.is_displayed())
        press(driver, "\ue00c")
        shown[3].find_element(By.CSS_SELECTOR, "button[data-decision=approve]").click()
        wait(driver, lambda d: decided(d)[3] == "approve")
        assert rows(sink) == [
            (uris[0], "approve", "alice", "looks fine to me", "violence"),
            (uris[1], "reject", "alice", None, None),
            (uris[3], "escalate", "alice", None, None),
            (uris[3], "undo", "alice", None, None),
            (uris[3], "approve", "alice", None, None),
        ]

        # sorting and the label filter
        Select(driver.find_element(By.ID, "sort")).select_by_value("age")
        Select(driver.find_element(By.ID, "label-filter")).select_by_value("nsfw")
        driver.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
        wait(driver, lambda d: "sort=age" in d.current_url and "label=nsfw" in d.current_url)
        again = [card.get_attribute("data-uri") for card in cards(driver)]
        assert uris[0] not in again and uris[4] in again

        # the stats page, then logging out gives every claim back and ends the session
        driver.find_element(By.ID, "stats-link").click()
        wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#reviewers tr[data-reviewer=alice]"))
        row = driver.find_element(By.CSS_SELECTOR, "#reviewers tr[data-reviewer=alice]")
        assert row.find_element(By.CSS_SELECTOR, ".standing").text == "3"
        assert row.find_element(By.CSS_SELECTOR, ".hour").text == "4"
        driver.find_element(By.ID, "queue-link").click()
        wait(driver, lambda d: d.find_elements(By.ID, "grid"))
        cookie = driver.get_cookie("imagemill_review")
        assert cookie is not None and len(live_claims(sink, "alice")) > 1
        driver.find_element(By.CSS_SELECTOR, "header form[action='/logout'] button").click()
        wait(driver, lambda d: "/login" in d.current_url)
        assert list(live_claims(sink, "alice")) == ["now"]
        with httpx.Client(base_url=app.url, cookies={"imagemill_review": cookie["value"]}) as replay:
            assert replay.get("/api/counts").status_code == 401


def test_the_page_keeps_its_claims_while_in_use_shows_those_it_lost_and_lets_go_when_idle(
    sink: str, browsers: list[WebDriver]
) -> None:
    """A reviewer slower than the lease keeps its items while the page is in use; an item taken
    meanwhile is marked lost before a key press on it; an abandoned tab frees its items."""
    with review_app(sink, audit_rate=0.0, page_size=4, lease_s=5, page_idle_s=4) as app:
        driver = open_browser(browsers)
        log_in(driver, app, "alice")
        uris = [card.get_attribute("data-uri") for card in cards(driver)]
        first = live_claims(sink, "alice")
        first_end = max(first[uri] for uri in uris)

        def use_until(condition: Any, seconds: float = 60) -> None:
            deadline = time.monotonic() + seconds
            keys = iter(["\ue014", "\ue012"] * 10_000)  # right, left: moving about, deciding nothing
            while not condition():
                assert time.monotonic() < deadline, "the condition never held while the page was in use"
                press(driver, next(keys))
                time.sleep(0.5)  # a person's pace, not a wait for the condition (which is polled)

        # in use past the first lease: still alice's, renewed
        use_until(lambda: live_claims(sink, "alice")["now"] > first_end)
        renewed = live_claims(sink, "alice")
        assert set(uris) <= set(renewed) and all(renewed[uri] > first_end for uri in uris)

        # another reviewer gets the second item (say alice's lease had run out): the page marks it
        with psycopg.connect(sink) as conn:
            conn.execute("UPDATE imagemill_review_claims SET reviewer = 'bob' WHERE uri = %s", (uris[1],))
        use_until(lambda: cards(driver)[1].get_attribute("data-lost") == "1")
        assert cards(driver)[1].find_element(By.CSS_SELECTOR, "p.lost").is_displayed()
        cards(driver)[1].click()
        press(driver, " ")
        press(driver, "a")
        wait(driver, lambda d: "no longer yours" in status(d))
        assert rows(sink) == []

        # left alone: the page stops renewing, says so, and the leases run out
        wait(driver, lambda d: d.find_element(By.ID, "idle").is_displayed(), 30)
        wait(driver, lambda d: list(live_claims(sink, "alice")) == ["now"], 60)
        press(driver, "\ue014")  # back: the page learns at once that the rest are gone
        wait(driver, lambda d: [c.get_attribute("data-lost") for c in cards(d)] == ["1"] * 4)


def test_two_reviewers_never_see_the_same_item_and_a_lead_decides_the_escalations(
    sink: str, browsers: list[WebDriver]
) -> None:
    with review_app(sink, audit_rate=0.0, page_size=5, reveal_before_deciding=False) as app:
        alice, bob = open_browser(browsers), open_browser(browsers)
        log_in(alice, app, "alice")
        log_in(bob, app, "bob")
        seen_by_alice = {card.get_attribute("data-uri") for card in cards(alice)}
        seen_by_bob = {card.get_attribute("data-uri") for card in cards(bob)}
        assert len(seen_by_alice) == 5 and len(seen_by_bob) == 5
        assert not seen_by_alice & seen_by_bob
        assert not bob.find_elements(By.ID, "leads-link")  # a reviewer has no leads' queue
        # reloading keeps each reviewer's own items; the queue has no third batch for bob to take
        bob.refresh()
        wait(bob, lambda d: d.find_elements(By.ID, "grid"))
        assert {card.get_attribute("data-uri") for card in cards(bob)} == seen_by_bob
        escalated = cards(alice)[0].get_attribute("data-uri")
        press(alice, "e")
        wait(alice, lambda d: decided(d)[0] == "escalate")
        assert rows(sink)[0][1:3] == ("escalate", "alice")

        # bob's browser passes to carol, a lead: the escalation waits in the leads' queue
        bob.find_element(By.CSS_SELECTOR, "header form[action='/logout'] button").click()
        wait(bob, lambda d: "/login" in d.current_url)
        log_in(bob, app, "carol")
        bob.find_element(By.ID, "leads-link").click()
        wait(bob, lambda d: "queue=leads" in d.current_url)
        (card,) = cards(bob)
        assert card.get_attribute("data-uri") == escalated
        assert card.find_element(By.CSS_SELECTOR, ".reason").text.lower() == "escalated"
        press(bob, "r")
        wait(bob, lambda d: decided(d)[0] == "reject")
        assert rows(sink)[-1][1:3] == ("reject", "carol")
        # back to the reviewers' queue, where the Skip button gives an item back at once
        bob.find_element(By.ID, "people-link").click()
        wait(bob, lambda d: "queue=leads" not in d.current_url and d.find_elements(By.ID, "grid"))
        skipped = cards(bob)[0]
        skipped.find_element(By.CSS_SELECTOR, "button[data-skip]").click()
        wait(bob, lambda d: cards(d)[0].get_attribute("data-skipped") == "1")
        assert skipped.get_attribute("data-uri") not in live_claims(sink, "carol")
