"""The web dashboard driven in headless Chromium (Debian's /usr/bin/chromium via Playwright;
no browser download): sign in, filter, open a message, see the chart; a screenshot is saved
to test-artifacts/."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.api_helpers import ARTIFACTS, CHROMIUM, FLAGS, ApiServer, event, need_chromium

BIDI_SUBJECT = "Invoice \u202egpj.exe"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path_factory.mktemp("browser")).start()
    events = []
    for h in range(12):
        for i in range(1 + h % 4):
            status = ("delivered", "deferred", "bounced", "accepted")[(h + i) % 4]
            events.append(
                event(
                    "acme",
                    age=timedelta(hours=h, minutes=i),
                    status=status,
                    subject=f"Report {h}-{i}",
                )
            )
    mid = "<history@mx.example>"
    events.append(
        event(
            "acme", age=timedelta(minutes=30), status="deferred", message_id=mid, subject="Tracked"
        )
    )
    events.append(
        event(
            "acme", age=timedelta(minutes=5), status="delivered", message_id=mid, subject="Tracked"
        )
    )
    # A subject with a right-to-left override (U+202E), as a sender may write it.
    events.append(event("acme", age=timedelta(minutes=1), subject=BIDI_SUBJECT))
    server.store.insert_events(events)
    try:
        yield server
    finally:
        server.stop()


def test_sign_in_filter_open_a_message_and_see_the_chart(api: ApiServer, tmp_path: Path) -> None:
    need_chromium()
    from playwright.sync_api import sync_playwright

    token = api.token("acme", "messages:read", "stats:read", name="browser")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        # Playwright gives each launch a fresh, empty profile directory of its own.
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(api.url + "/", timeout=30_000)
            # A wrong token is refused on the sign-in form.
            page.fill("#token", "mm_000000000000_" + "A" * 43)
            page.click("#signin-form button")
            page.wait_for_selector("#signin-error:has-text('invalid')", timeout=15_000)
            page.fill("#token", token)
            page.click("#signin-form button")
            page.wait_for_selector("#messages tbody tr.row", timeout=15_000)
            assert "customer acme" in page.inner_text("#who")
            # The chart: bars for the hours with messages.
            page.wait_for_selector("#chart svg rect.bar", timeout=15_000)
            assert int(page.get_attribute("#chart svg", "data-bars") or 0) >= 10
            # Filter by status.
            page.select_option("#f-status", "deferred")
            page.click("#apply")
            page.wait_for_function(
                "() => [...document.querySelectorAll('#messages tbody tr.row')].length > 0 &&"
                " [...document.querySelectorAll('#messages tbody tr.row .status')]"
                ".every(s => s.textContent === 'deferred')",
                timeout=15_000,
            )
            # Filter by subject text, then open the message: its status history.
            page.fill("#f-subject", "tracked")
            page.select_option("#f-status", "")
            page.click("#apply")
            page.wait_for_function(
                "() => document.querySelectorAll('#messages tbody tr.row').length === 2",
                timeout=15_000,
            )
            page.click("#messages tbody tr.row >> nth=0")
            page.wait_for_selector("#detail:not([hidden]) #history li", timeout=15_000)
            history = page.inner_text("#history")
            assert history.index("deferred") < history.index("delivered")
            assert "policy version 3" in page.inner_text("#detail-policy")
            assert "HMAC-hashed" in page.inner_text("tr[data-field='mail_from']")
            # Clear the subject filter so the screenshot shows a full table and the chart.
            page.fill("#f-subject", "")
            page.click("#apply")
            page.wait_for_selector("#messages tbody tr.row >> nth=5", timeout=15_000)
            page.click("#messages tbody tr.row >> nth=0")
            page.wait_for_selector("#detail:not([hidden]) #history li", timeout=15_000)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()


# Every cell of the row, and the element holding each stored value: computed unicode-bidi.
_ISOLATION = """() => {
  const row = [...document.querySelectorAll('#messages tbody tr.row')]
    .find(tr => tr.textContent.includes('\u202e'));
  const cells = [...row.cells].map(td => getComputedStyle(td).unicodeBidi);
  const holders = [...row.querySelectorAll('bdi')].map(b => [b.textContent, getComputedStyle(b).unicodeBidi]);
  return {cells, holders};
}"""


def test_a_subject_with_bidi_controls_is_isolated(api: ApiServer) -> None:
    need_chromium()
    from playwright.sync_api import sync_playwright

    token = api.token("acme", "messages:read", "stats:read", name="bidi")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(api.url + "/", timeout=30_000)
            page.fill("#token", token)
            page.click("#signin-form button")
            page.fill("#f-subject", "gpj.exe")
            page.click("#apply")
            page.wait_for_function(
                "() => document.querySelectorAll('#messages tbody tr.row').length === 1",
                timeout=15_000,
            )
            got = page.evaluate(_ISOLATION)
            assert got["cells"] == ["isolate"] * 6, got
            assert [BIDI_SUBJECT, "isolate"] in got["holders"], got
            assert all(style == "isolate" for _, style in got["holders"]), got
            # The detail view too: the subject is a <bdi> of its own, isolated.
            page.click("#messages tbody tr.row >> nth=0")
            page.wait_for_selector("#detail:not([hidden]) tr[data-field='subject']")
            detail = page.evaluate(
                "() => { const b = document.querySelector(\"tr[data-field='subject'] td bdi\");"
                " return [b.textContent, getComputedStyle(b).unicodeBidi,"
                " getComputedStyle(b.parentElement).unicodeBidi]; }"
            )
            assert detail == [BIDI_SUBJECT, "isolate", "isolate"], detail
        finally:
            browser.close()
