"""A real headless Chromium (Debian's chromium + chromedriver, driven by Selenium) completes a rater
session through the page, using the mouse for some pairs and the keyboard shortcuts for the rest, and
every vote lands in the database with the side the browser clicked mapped to the right arm."""

from __future__ import annotations

import shutil
import tempfile

import pytest
from sqlalchemy import select

from addpipe.eval.db import Assignment, Rater, Vote, connect, session_factory
from addpipe.eval.server import create_app
from addpipe.eval.study import invite
from live_server import ServerThread
from test_study_server import write_study

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="addpipe-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_headless_chromium_completes_a_rater_session(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    directory = write_study(tmp_path / "study")
    url = f"sqlite:///{directory / 'votes.db'}"
    sessions = session_factory(connect(url))
    with sessions() as session:
        rater = invite(session, directory, raters=1, pairs_per_rater=5, golden_fraction=0.2)[0]
    wait = WebDriverWait(browser, 30)
    clicked: dict[int, dict[str, str]] = {}
    with ServerThread(create_app(directory, url)) as server:
        browser.get(f"{server.url}/rate/{rater['token']}")
        wait.until(ec.text_to_be_present_in_element((By.ID, "progress"), "0 / 6"))
        for index in range(6):
            wait.until(lambda d: d.find_element(By.ID, "prompt").text.strip() != "")
            wait.until(lambda d: d.execute_script(
                "return document.getElementById('left').complete && document.getElementById('left').naturalWidth > 0"
                " && document.getElementById('right').complete && document.getElementById('right').naturalWidth > 0"))
            pair_id = browser.execute_script("return task.pair_id")
            if index % 2 == 0:  # mouse
                answers = {"adherence": "left", "quality": "right"} if index % 4 == 0 else {"adherence": "tie", "quality": "left"}
                for question, answer in answers.items():
                    browser.find_element(By.CSS_SELECTOR, f'button.answer[data-question="{question}"][data-answer="{answer}"]').click()
                browser.find_element(By.ID, "submit").click()
            else:  # keyboard: A/S/D for the first question, J/K/L for the second, Enter to submit
                answers = {"adherence": "right", "quality": "tie"}
                body = browser.find_element(By.TAG_NAME, "body")
                body.send_keys("d")
                body.send_keys("k")
                body.send_keys("\n")
            clicked[pair_id] = answers
            wait.until(ec.text_to_be_present_in_element((By.ID, "progress"), f"{index + 1} / 6"))
        wait.until(ec.visibility_of_element_located((By.ID, "done")))
    with sessions() as session:
        votes = session.scalars(select(Vote)).all()
        assert len(votes) == 12 and {v.pair_id for v in votes} == set(clicked)
        for v in votes:
            a_on_left = session.scalar(select(Assignment.a_on_left).where(Assignment.pair_id == v.pair_id))
            side = clicked[v.pair_id][v.question]
            assert v.side == side
            assert v.choice == ("tie" if side == "tie" else ("a" if (side == "left") == a_on_left else "b"))
            assert v.response_ms is not None and v.response_ms >= 0
        assert session.scalar(select(Rater.name)) == rater["name"]


class FlakyNext:
    """ASGI wrapper: the first `failures` requests to /api/next get a plain-text 500, as a crashed worker behind a
    proxy would answer; everything else reaches the real app."""

    def __init__(self, app, failures: int):
        self.app, self.failures, self.refused = app, failures, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/api/next" and self.refused < self.failures:
            self.refused += 1
            await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"Internal Server Error"})
            return
        await self.app(scope, receive, send)


def test_the_page_says_what_failed_and_retries_instead_of_hanging(tmp_path, browser):
    """A non-JSON 500 from /api/next is shown to the rater and retried; the pair then appears and can be rated.
    A wrong invite link shows a page, not raw JSON."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    directory = write_study(tmp_path / "study")
    url = f"sqlite:///{directory / 'votes.db'}"
    sessions = session_factory(connect(url))
    with sessions() as session:
        rater = invite(session, directory, raters=1, pairs_per_rater=1, golden_fraction=0.0)[0]
    flaky = FlakyNext(create_app(directory, url), failures=2)
    wait = WebDriverWait(browser, 30)
    with ServerThread(flaky) as server:
        browser.get(f"{server.url}/rate/{rater['token']}")
        wait.until(lambda d: "Could not load the next pair (the server answered 500" in d.find_element(By.ID, "message").text)
        assert "trying again" in browser.find_element(By.ID, "message").text
        wait.until(lambda d: d.find_element(By.ID, "prompt").text.strip() != "")  # recovered on its own
        assert flaky.refused == 2 and browser.find_element(By.ID, "message").text == ""
        for question in ("adherence", "quality"):
            browser.find_element(By.CSS_SELECTOR, f'button.answer[data-question="{question}"][data-answer="left"]').click()
        browser.find_element(By.ID, "submit").click()
        wait.until(lambda d: d.find_element(By.ID, "done").is_displayed())

        browser.get(f"{server.url}/rate/not-a-real-token")
        assert "This invite link is not valid" in browser.find_element(By.TAG_NAME, "h1").text
    with sessions() as session:
        assert len(session.scalars(select(Vote)).all()) == 2
