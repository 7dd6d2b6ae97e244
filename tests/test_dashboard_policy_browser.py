"""The policy editor of the web dashboard in headless Chromium (see test_dashboard_browser):
an operator views a customer's policy and history, types an invalid policy (the API's reason
appears), a valid one (diff and preview on stored rows appear), applies it to stored rows, and
sees the new version and the audit entries. The policy routes run on a real broker's policies
topic, as in the sink; a customer's token never sees the editor."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Page

from mailmeta.config import Settings
from tests.api_helpers import ARTIFACTS, CHROMIUM, CUSTOMERS, FLAGS, ApiServer, event, need_chromium

pytestmark = [pytest.mark.slow, pytest.mark.kafka]


@pytest.fixture
def policy_api(settings: Settings, tmp_path: Path) -> Iterator[ApiServer]:
    """The API with the policy routes on a real broker's policies topic (seeded from the
    customers: acme's version 3), and a few stored messages to preview."""
    server = ApiServer(tmp_path)
    server.install_policies(settings, CUSTOMERS)
    server.store.insert_events(
        [event("acme", age=timedelta(minutes=i), subject=f"Invoice {i}") for i in range(3)]
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _edit(page: Page, policy: str) -> None:
    # Typed, not filled: the editor validates on each input event, as it does for a person.
    page.fill("#p-editor", "")
    page.locator("#p-editor").press_sequentially(policy)


@pytest.mark.parametrize("broker", ["kafka"], indirect=True)
def test_operator_edits_previews_and_applies_a_policy(policy_api: ApiServer) -> None:
    need_chromium()
    from playwright.sync_api import sync_playwright

    reader = policy_api.token("acme", "messages:read", "stats:read", name="reader")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            refused: set[tuple[int, str]] = set()
            page.on(
                "response",
                lambda r: (
                    refused.add((r.status, urlsplit(r.url).path)) if r.status >= 400 else None
                ),
            )
            # A customer's token sees messages, never the policy editor.
            page.goto(policy_api.url + "/", timeout=30_000)
            page.fill("#token", reader)
            page.click("#signin-form button")
            page.wait_for_selector("#messages tbody tr.row", timeout=15_000)
            assert page.is_hidden("#policy")
            page.click("#signout")

            page.fill("#token", policy_api.operator)
            page.click("#signin-form button")
            page.wait_for_selector("#policy:not([hidden]) #p-history li", timeout=15_000)
            assert page.inner_text("#p-customer") == "acme"
            assert "version 3" in page.inner_text("#p-version")
            assert '"mail_from": "hmac"' in page.inner_text("#p-current")

            # An action this field cannot take: the API's reason, named by field, as typed.
            _edit(page, '{"mail_from": "hmac", "helo": "domain_only"}')
            page.wait_for_selector("#p-problems li:has-text('helo')", timeout=15_000)
            assert page.is_disabled("#p-apply")
            assert page.locator("#p-preview tbody tr").count() == 0
            # Not JSON at all: said before anything is sent.
            _edit(page, '{"mail_from": ')
            page.wait_for_selector("#p-validation:has-text('Not valid JSON')", timeout=15_000)

            # A valid change: subjects dropped, senders masked. Diff and preview appear.
            new_policy = (
                '{"mail_from": "mask", "rcpt_to": "hmac", "message_id": "keep",'
                ' "smtp_reply": "keep", "size_bytes": "keep", "sender_ip": "truncate_ip"}'
            )
            _edit(page, new_policy)
            page.wait_for_selector("#p-validation.ok", timeout=15_000)
            page.wait_for_selector("#p-diff tr[data-field='subject']", timeout=15_000)
            assert page.inner_text("#p-diff tr[data-field='subject'] td.old") == "keep"
            assert page.inner_text("#p-diff tr[data-field='subject'] td.new") == "drop"
            assert page.inner_text("#p-diff tr[data-field='mail_from'] td.new") == "mask"
            assert page.locator("#p-preview tr.sample").count() == 3
            subject = page.locator("#p-preview tr.changed[data-field='subject'] >> nth=0")
            assert "Invoice" in subject.inner_text() and "drop" in subject.inner_text()
            assert "already redacted" in page.inner_text("#p-note")

            # Apply, rewriting stored rows: version 4 is in force, in the history and audit.
            page.check("#p-apply-stored")
            assert page.inner_text("#p-apply") == "Apply as version 4"
            page.click("#p-apply")
            page.wait_for_selector("#p-result:has-text('Version 4 is in force')", timeout=30_000)
            assert "3 stored rows rewritten" in page.inner_text("#p-result")
            # The message table is reloaded: the rewritten rows have no subject any more.
            page.wait_for_function(
                "() => document.querySelectorAll('#messages tbody tr.row').length === 3 &&"
                " !document.querySelector('#messages tbody').textContent.includes('Invoice')",
                timeout=15_000,
            )
            assert "version 4" in page.inner_text("#p-version")
            # No redaction worker runs here: none reports it applied (policy/_applied.py).
            assert "Published v4, applied by 0 of 0" in page.inner_text("#p-applied")
            assert '"subject"' not in page.inner_text("#p-current")
            assert page.locator("#p-history li[data-version='4']").count() == 1
            entry = page.locator("#p-audit tr[data-action='policy.set']").first
            assert "v3 → v4" in entry.inner_text() and "subject: keep → drop" in entry.inner_text()
            assert page.locator("#p-audit tr[data-action='policy.apply_to_stored']").count() == 1
            # The editor now holds the policy in force: nothing left to apply.
            page.wait_for_selector("#p-validation:has-text('same as the policy in force')")
            assert page.is_disabled("#p-apply")
            page.screenshot(path=str(ARTIFACTS / "dashboard-policy.png"), full_page=True)
            assert not errors, errors
            # The only refusals: the invalid policy, and the favicon the page does not have.
            assert refused <= {(422, "/v1/policies/validate"), (404, "/favicon.ico")}, refused
            assert (422, "/v1/policies/validate") in refused
        finally:
            browser.close()
    # What the page showed is what the API holds: the same API the CLI uses.
    with policy_api.client(policy_api.operator) as c:
        shown = c.get("/v1/policies/acme").json()
    assert shown["version"] == 4 and "subject" not in shown["policy"]
    rows = policy_api.store.query_messages("acme", limit=10)
    assert rows and all(r["subject"] is None and r["policy_version"] == 4 for r in rows)
