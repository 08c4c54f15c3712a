"""`fleet status --html`: one self-contained page, tested in a real headless Chromium
(Debian's chromium + chromium-driver through Selenium)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import Fleet, agent
from test_rollout import write_drop

pytestmark = pytest.mark.skipif(shutil.which("chromedriver") is None,
                                reason="chromium-driver is not installed (scripts/test.sh "
                                       "installs it)")


@pytest.fixture
def browser():
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=opts, service=service)
    yield driver
    driver.quit()


def test_the_page_shows_every_host_and_the_counts_of_json(tmp_path, browser):
    from selenium.webdriver.common.by import By

    drop = tmp_path / "drop"
    drop.mkdir()
    write_drop(drop, 200)
    fleet = Fleet(tmp_path)  # a repository for the timeline
    out = tmp_path / "fleet.html"
    p = agent("fleet", "status", "--reports", str(drop), "--stale", "1000000d", "--json",
              "--repo", str(fleet.work), "--html", str(out), check=None)
    data = json.loads(p.stdout)
    text = out.read_text()
    assert "<script" not in text and "http://" not in text and "https://" not in text
    browser.get(out.as_uri())
    assert browser.title == "gitops-agent fleet"
    hosts = browser.find_elements(By.CSS_SELECTOR, "#hosts tr.host")
    assert len(hosts) == 200
    assert {h.get_attribute("data-host") for h in hosts} == {r["host"] for r in data["rows"]}
    for w in data["waves"]:
        row = browser.find_element(By.CSS_SELECTOR, f'#waves tr[data-wave="{w["wave"]}"]')
        for key in ("hosts", "applied", "failed", "waiting"):
            assert row.find_element(By.CSS_SELECTOR, f"td.{key}").text == str(w[key])
    assert browser.find_elements(By.CSS_SELECTOR, "#timeline tr")  # header + commits
    # a hostile report's text is shown as text, never run
    assert "<script>alert(1)</script>" in browser.find_element(By.ID, "hosts").text
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
