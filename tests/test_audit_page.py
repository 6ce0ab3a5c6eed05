"""The /audit page in a real headless Chromium: it verifies real proof bundles from a real
gateway in the browser (WebCrypto), shows each check, the first failure and why, the events as
a timeline and the hash chain of a prescription; given witness keys, it also checks that a quorum
of those witnesses cosigned each checkpoint.

One gateway and one browser serve the whole module. Chromium and ChromeDriver are Debian's
(`make browser` installs them); CHROMIUM and CHROMEDRIVER name others.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait
from test_prescriptions import (
    Databases,
    Gateway,
    Parties,
    launch,
    running,
    wait_for,
)

from anchoring.cosignature import Cosigner
from anchoring.note import Signer, split_note
from anchoring.verify import inclusion_proof_length

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
WINDOW = (1100, 900)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
HISTORY = "query($id: ID!) { prescription(id: $id) { history { version type bundle } } }"
CHECK_NAMES = ("bundle", "key", "signature", "size", "root")
WITNESS_CHECK_NAMES = (*CHECK_NAMES, "quorum")  # with witness keys given
LIFECYCLE = ["ISSUED", "DISPENSED", "HANDED_TO_COURIER", "DELIVERED", "RECEIPT_CONFIRMED"]


# --- the gateway, its prescriptions, the browser ----------------------------------------------


@pytest.fixture(scope="module")
def gw(
    mongo_uri: str,
    databases: Databases,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    launched = launch(
        mongo_uri, databases.new(), tmp_path_factory.mktemp("audit"), RXLEDGER_RATE_LIMIT="0"
    )
    with running(launched) as (gateway,):
        yield gateway


@dataclass
class Story:
    """Real bundles: a prescription through its whole lifecycle, and another one dispensed."""

    key: str
    rid: str
    bundles: list[dict[str, Any]]  # version 1, 2, ... of `rid`
    other_rid: str
    other_bundles: list[dict[str, Any]]
    actors: list[str]


def anchored_bundles(p: Parties, rid: str, count: int) -> list[dict[str, Any]]:
    """The proof bundles of a prescription's events, once a checkpoint covers all `count`."""

    def bundles() -> list[dict[str, Any]] | None:
        history = p.gw.data(HISTORY, p.auditor, id=rid)["prescription"]["history"]
        if len(history) == count and all(e["bundle"] for e in history):
            return [json.loads(e["bundle"]) for e in sorted(history, key=lambda e: e["version"])]
        return None

    found: list[dict[str, Any]] = wait_for(bundles, f"the bundles of {rid}")
    return found


@pytest.fixture(scope="module")
def story(gw: Gateway) -> Story:
    p, q = Parties(gw), Parties(gw)
    rid = p.issued()
    p.advance(rid, "CONFIRMED")
    other = q.issued()
    q.advance(other, "DISPENSED")
    return Story(
        key=gw.verifier_key(),
        rid=rid,
        bundles=anchored_bundles(p, rid, 5),
        other_rid=other,
        other_bundles=anchored_bundles(q, other, 2),
        actors=[
            f"PRESCRIBER:dr-{p.uid}",
            f"PHARMACIST:ph-{p.uid}",
            f"PHARMACIST:ph-{p.uid}",
            "COURIER:c-7",
            "PATIENT",
        ],
    )


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: run `make browser` to install Debian's "
            "chromium and chromium-driver (or set CHROMIUM and CHROMEDRIVER)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield browser
    finally:
        browser.quit()


# --- the page, as a user sees it --------------------------------------------------------------


@dataclass
class Check:
    name: str
    state: str  # passed, failed, skipped
    text: str


@dataclass
class Report:
    """One bundle's result, as the page shows it."""

    label: str  # which bundle: its file, or its place in the pasted text
    title: str
    verdict: str
    checks: list[Check]

    @property
    def failed(self) -> tuple[int, str] | None:
        """(1-based number, text) of the failed check."""
        for i, check in enumerate(self.checks, 1):
            if check.state == "failed":
                return i, check.text
        return None


# What the page shows, read in one round trip (innerText: the text as rendered).
READ_PAGE = """
const text = (node) => (node ? node.innerText.trim() : "");
const section = document.getElementById("timeline-section");
const columns = [...document.querySelectorAll("#timeline thead th")].map((th) => th.textContent);
const summary = document.getElementById("summary");
const chain = document.getElementById("chain");
return {
  summary: text(summary),
  verdict: summary.dataset.verdict ?? null,
  reports: [...document.querySelectorAll("#bundle-reports details.bundle")].map((d) => ({
    label: d.querySelector("summary .label").textContent,
    title: text(d.querySelector("summary")),
    verdict: d.dataset.verdict,
    checks: [...d.querySelectorAll("ol.checks > li")].map(
      (li) => [li.dataset.check, li.dataset.state, text(li)]),
  })),
  timeline: section.hidden ? [] : [...document.querySelectorAll("#timeline tbody tr")].map(
    (tr) => Object.fromEntries([...tr.cells].map((td, i) => [columns[i], text(td)]))),
  chain: [chain.dataset.chain ?? null, text(chain)],
};
"""


class AuditPage:
    def __init__(self, driver: webdriver.Chrome, base: str) -> None:
        self.driver = driver
        self.base = base

    def open(self) -> AuditPage:
        self.driver.get(f"{self.base}/audit")  # returns once the page has loaded
        return self

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait(self, condition: Callable[[], Any], timeout: float = 10) -> Any:
        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(lambda d: condition())

    def type_key(self, key: str) -> None:
        field = self.find("#key")
        field.clear()
        field.send_keys(key)

    def paste(self, text: str, into: str = "#bundles") -> None:
        """Put `text` in a field at once, as a paste does (typing it is slow)."""
        self.driver.execute_script(
            "arguments[0].value = arguments[1];"
            "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
            self.find(into),
            text,
        )

    def _run(self) -> tuple[int, str]:
        run, busy = self.driver.execute_script(
            "const r = document.getElementById('results');"
            "return [Number(r.dataset.run), r.getAttribute('aria-busy')];"
        )
        return int(run), str(busy)

    def verify(self, submit: Callable[[], None] | None = None) -> None:
        """Press Verify (or `submit`) and wait until the results are in; the browser must have
        logged no error (a Content-Security-Policy violation would be one)."""
        before, _ = self._run()
        (submit or self.find("#verify").click)()
        self.wait(lambda: (lambda run: run[0] > before and run[1] == "false")(self._run()), 15)
        errors = [e for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors

    def check(self, bundles: str, key: str, witnesses: str = "", quorum: str = "") -> AuditPage:
        self.open()
        self.type_key(key)
        if witnesses:
            self.paste(witnesses, into="#witnesses")
        if quorum:
            self.find("#quorum").send_keys(quorum)
        self.paste(bundles)
        self.verify()
        return self

    def read(self) -> dict[str, Any]:
        shown: dict[str, Any] = self.driver.execute_script(READ_PAGE)
        return shown

    @property
    def summary(self) -> str:
        return str(self.read()["summary"])

    @property
    def verdict(self) -> str | None:
        return self.read()["verdict"]

    def reports(self) -> list[Report]:
        """Each bundle's result, unfolded first: a verified bundle's checks are folded away."""
        self.driver.execute_script(
            "for (const s of document.querySelectorAll('details.bundle:not([open]) > summary'))"
            " s.click();"
        )
        return [
            Report(r["label"], r["title"], r["verdict"], [Check(*c) for c in r["checks"]])
            for r in self.read()["reports"]
        ]

    def timeline(self) -> list[dict[str, str]]:
        """The timeline's rows as {column: text}."""
        rows: list[dict[str, str]] = self.read()["timeline"]
        return rows

    @property
    def chain(self) -> tuple[str | None, str]:
        verdict, text = self.read()["chain"]
        return verdict, text


@pytest.fixture
def page(driver: webdriver.Chrome, gw: Gateway) -> AuditPage:
    return AuditPage(driver, gw.base)


SCREENSHOT = (1100, 1240)  # tall enough for the whole timeline of five events


def save_screenshot(page: AuditPage, path: Path) -> None:
    """The page at exactly SCREENSHOT's size (the window's own size includes its frame)."""
    width, height = SCREENSHOT
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    page.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        page.driver.execute_script("window.scrollTo(0, 0)")
        path.write_bytes(page.driver.get_screenshot_as_png())
    finally:
        page.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def as_text(*bundles: dict[str, Any]) -> str:
    return json.dumps(bundles[0] if len(bundles) == 1 else list(bundles), indent=2)


def assert_verified(report: Report) -> None:
    assert report.verdict == "verified", report
    assert [(c.name, c.state) for c in report.checks] == [(n, "passed") for n in CHECK_NAMES]
    assert "verified: all 5 checks passed" in report.title


def leaf_hash(bundle: dict[str, Any]) -> str:
    leaf = base64.b64decode(bundle["leaf"])
    return base64.b64encode(hashlib.sha256(b"\x00" + leaf).digest()).decode()


# --- the page itself ---------------------------------------------------------------------------


def test_the_page_is_served_with_a_strict_content_security_policy(gw):
    page = httpx.get(f"{gw.base}/audit", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    assert '<script type="module" src="/static/audit.js"></script>' in html
    assert '<link rel="stylesheet" href="/static/audit.css">' in html
    # Nothing inline for the policy to refuse: no script bodies, styles or handlers.
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=", html, re.I)
    script = httpx.get(f"{gw.base}/static/audit.js", timeout=10)
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert "crypto.subtle" in script.text
    style = httpx.get(f"{gw.base}/static/audit.css", timeout=10)
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")


# --- verified bundles ------------------------------------------------------------------------


def test_a_valid_bundle_passes_every_check_and_shows_its_event(page, story):
    page.check(as_text(story.bundles[0]), story.key)
    assert page.verdict == "verified"
    assert "Verified: the bundle passes all 5 checks." in page.summary
    (report,) = page.reports()
    assert_verified(report)
    origin, size = story.bundles[0]["checkpoint"].split("\n")[:2]
    key_name, key_id = story.key.split("+")[:2]
    texts = [c.text for c in report.checks]
    assert f"at index {story.bundles[0]['leafIndex']}, tree size {size}" in texts[0]
    assert f"{key_name}+{key_id}, an Ed25519 key" in texts[1]
    assert f"signed by {key_name}+{key_id}, origin {origin}" in texts[2]
    assert f"both are {size}" in texts[3]
    assert "root " + story.bundles[0]["checkpoint"].split("\n")[2] in texts[4]
    (row,) = page.timeline()
    header = json.loads(base64.b64decode(story.bundles[0]["leaf"]))
    assert row == {
        "Version": "1",
        "Event": "ISSUED",
        "Actor": story.actors[0],
        "Time": header["at"],
        "Leaf index": str(story.bundles[0]["leafIndex"]),
        "Proof": "✓ verified",
        "Chain": "✓ first version",
    }
    assert page.chain[0] == "single"
    assert story.rid in page.find("#timeline caption").text


def test_the_bundles_of_a_prescription_show_its_timeline_and_a_complete_chain(page, story):
    shuffled = random.Random(7).sample(story.bundles, len(story.bundles))
    page.check(as_text(*shuffled), story.key)
    assert page.verdict == "verified", page.summary
    assert "Verified: all 5 bundles pass all 5 checks." in page.summary
    assert "Hash chain complete." in page.summary
    for report in page.reports():
        assert_verified(report)
    rows = page.timeline()
    assert [r["Version"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert [r["Event"] for r in rows] == LIFECYCLE
    assert [r["Actor"] for r in rows] == story.actors
    assert [r["Leaf index"] for r in rows] == [str(b["leafIndex"]) for b in story.bundles]
    assert {r["Proof"] for r in rows} == {"✓ verified"}
    assert [r["Chain"] for r in rows] == ["✓ first version"] + [
        f"✓ links to version {v}" for v in range(1, 5)
    ]
    assert page.chain == (
        "complete",
        "✓ Hash chain complete: versions 1 to 5, each prev equal to the leaf hash of the "
        "version before.",
    )
    screenshot = os.environ.get("RXLEDGER_SCREENSHOT")
    if screenshot:
        save_screenshot(page, Path(screenshot))


def test_exported_files_chosen_in_the_file_input_fill_the_key_and_verify(page, story, tmp_path):
    # As `rxledger export-proof` writes them: a bundle per event and the verifier key.
    paths = []
    for bundle in story.bundles[:3]:
        version = json.loads(base64.b64decode(bundle["leaf"]))["version"]
        paths.append(tmp_path / f"{story.rid}-v{version}.json")
        paths[-1].write_text(json.dumps(bundle))
    (tmp_path / "verifier.key").write_text(story.key + "\n")
    page.open()
    page.find("#files").send_keys("\n".join(str(p) for p in [tmp_path / "verifier.key", *paths]))
    page.wait(lambda: len(page.all("#file-list li")) == 3)
    assert page.find("#key").get_attribute("value") == story.key
    assert (
        "verifier.key: verifier key filled in; 3 files to verify." in page.find("#file-status").text
    )
    page.verify()
    assert page.verdict == "verified", page.summary
    assert [r.label.split(" — ")[0] for r in page.reports()] == [p.name for p in paths]
    assert [r["Event"] for r in page.timeline()] == LIFECYCLE[:3]
    assert page.chain[0] == "complete"
    # A file can be taken out again, from the keyboard too.
    page.find(f"#file-list button[aria-label='Remove {paths[0].name}']").send_keys(Keys.ENTER)
    page.wait(lambda: len(page.all("#file-list li")) == 2)
    page.verify()
    assert page.chain[0] == "incomplete"
    assert "version 1 not given" in page.timeline()[0]["Chain"]


def test_dropped_files_fill_the_key_and_verify(page, story):
    page.open()
    files = [("verifier.key", story.key)] + [
        (f"{story.rid}-v{i}.json", json.dumps(b)) for i, b in enumerate(story.bundles, 1)
    ]
    # What the browser hands the page when files are dropped on it.
    page.driver.execute_script(
        """const transfer = new DataTransfer();
        for (const [name, text] of arguments[1]) transfer.items.add(new File([text], name));
        for (const type of ['dragenter', 'dragover', 'drop']) {
          arguments[0].dispatchEvent(new DragEvent(type, {
            dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""",
        page.find("#dropzone"),
        files,
    )
    page.wait(lambda: len(page.all("#file-list li")) == 5)
    assert page.find("#key").get_attribute("value") == story.key
    assert "dragging" not in (page.find("#dropzone").get_attribute("class") or "")
    page.verify()
    assert page.verdict == "verified", page.summary
    assert [r["Event"] for r in page.timeline()] == LIFECYCLE
    assert page.chain[0] == "complete"


def test_the_page_works_from_the_keyboard(page, story):
    page.open()
    order = []
    page.find("#key").click()
    for _ in range(7):
        order.append(page.driver.switch_to.active_element.get_attribute("id"))
        ActionChains(page.driver).send_keys(Keys.TAB).perform()
    assert order == ["key", "witnesses", "quorum", "bundles", "files", "verify", "clear"]
    page.paste(as_text(story.bundles[1]))
    key = page.find("#key")
    key.send_keys(story.key)
    page.verify(lambda: key.send_keys(Keys.ENTER))  # Enter in the key field submits
    assert page.verdict == "verified", page.summary
    # A verified bundle's checks are folded; its summary opens them with the keyboard.
    details = page.find("#bundle-1")
    assert details.get_attribute("open") is None
    details.find_element(By.TAG_NAME, "summary").send_keys(Keys.ENTER)
    assert details.get_attribute("open") is not None
    assert details.find_element(By.CSS_SELECTOR, "li[data-check=root]").is_displayed()


def test_every_control_is_labelled_and_results_are_announced(page):
    page.open()
    for control in ("key", "witnesses", "quorum", "bundles", "files"):
        label = page.find(f"label[for={control}]")
        assert label.is_displayed() and label.text, control
        hint = page.find(f"#{control}").get_attribute("aria-describedby")
        assert hint and page.find(f"#{hint}").text, control
    summary = page.find("#summary")
    assert (summary.get_attribute("role"), summary.get_attribute("aria-live")) == (
        "status",
        "polite",
    )
    assert page.find("#results").get_attribute("aria-busy") == "false"
    assert [b.text for b in page.all("form button")] == ["Verify", "Clear"]
    assert page.driver.execute_script("return document.documentElement.lang") == "en"


def test_text_from_a_bundle_is_shown_as_text_never_as_markup(page, story):
    bundle = copy.deepcopy(story.bundles[0])
    header = json.loads(base64.b64decode(bundle["leaf"]))
    header["actor"] = '<img src="/x" id="injected">'
    bundle["leaf"] = base64.b64encode(json.dumps(header).encode()).decode()
    page.check(as_text(bundle), story.key)
    assert page.timeline()[0]["Actor"] == '<img src="/x" id="injected">'
    assert page.all("#injected") == []
    (report,) = page.reports()
    assert report.failed is not None and report.failed[0] == 5


def test_the_page_is_readable_at_320_pixels_wide(page, story):
    page.driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 320, "height": 800, "deviceScaleFactor": 1, "mobile": True},
    )
    try:
        page.check(as_text(*story.bundles), story.key)
        assert page.verdict == "verified", page.summary
        assert page.driver.execute_script("return document.documentElement.scrollWidth") <= 320
        # The timeline's rows become cards, each value labelled.
        assert page.find("#timeline tbody td").value_of_css_property("display") == "block"
        cells = page.all("#timeline tbody tr:first-child td")
        labels = [
            page.driver.execute_script(
                "return getComputedStyle(arguments[0], '::before').content", td
            )
            for td in cells
        ]
        assert labels[:3] == ['"Version: "', '"Event: "', '"Actor: "'], labels
        assert [td.text for td in cells[:3]] == ["1", "ISSUED", story.actors[0]]
    finally:
        page.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


# --- tampered bundles and wrong keys --------------------------------------------------------


def flip_leaf_byte(b: dict[str, Any], story: Story) -> None:
    leaf = bytearray(base64.b64decode(b["leaf"]))
    at = leaf.index(b'"at":"') + len(b'"at":"') + 3  # the last digit of the year
    leaf[at] ^= 0x01
    b["leaf"] = base64.b64encode(bytes(leaf)).decode()


def alter_path_element(b: dict[str, Any], story: Story) -> None:
    first = bytearray(base64.b64decode(b["inclusionPath"][0]))
    first[0] ^= 0x80
    b["inclusionPath"][0] = base64.b64encode(bytes(first)).decode()


def wrong_leaf_index(b: dict[str, Any], story: Story) -> None:
    # Another index whose path has the same length, so only the rebuilt root can tell.
    index, size = b["leafIndex"], b["treeSize"]
    want = inclusion_proof_length(index, size)
    b["leafIndex"] = next(
        i for i in range(size) if i != index and inclusion_proof_length(i, size) == want
    )


def set_field(name: str, value: Callable[[dict[str, Any]], Any]) -> Callable[..., None]:
    def change(b: dict[str, Any], story: Story) -> None:
        b[name] = value(b)

    return change


def edit_root_line(b: dict[str, Any], story: Story) -> None:
    lines = b["checkpoint"].split("\n")
    lines[2] = base64.b64encode(hashlib.sha256(b"another root").digest()).decode()
    b["checkpoint"] = "\n".join(lines)


def sign_with_another_key(b: dict[str, Any], story: Story) -> None:
    text = b["checkpoint"][: b["checkpoint"].rindex("\n\n") + 1]
    name = story.key.split("+")[0]  # the same name, another key: another key ID
    b["checkpoint"] = Signer(name, Ed25519PrivateKey.generate()).sign_note(text)


def delete(name: str) -> Callable[..., None]:
    def change(b: dict[str, Any], story: Story) -> None:
        del b[name]

    return change


def another_logs_key(key: str) -> str:
    return Signer(key.split("+")[0], Ed25519PrivateKey.generate()).verifier_key


def wrong_key_id(key: str) -> str:
    name, key_id, public = key.split("+", 2)
    return f"{name}+{(int(key_id, 16) ^ 1):08x}+{public}"


@dataclass
class Tampering:
    bundle: Callable[[dict[str, Any], Story], None] | None = None
    key: Callable[[str], str] | None = None
    text: Callable[[str], str] | None = None


TAMPERED = {
    "leaf-byte-flipped": (Tampering(flip_leaf_byte), 5, "root mismatch: the root rebuilt"),
    "path-element-altered": (Tampering(alter_path_element), 5, "root mismatch: the root rebuilt"),
    "wrong-leaf-index": (Tampering(wrong_leaf_index), 5, "root mismatch: the root rebuilt"),
    "leaf-index-not-in-tree": (
        Tampering(set_field("leafIndex", lambda b: b["treeSize"])),
        5,
        "is out of range: it must be less than treeSize",
    ),
    "path-too-short": (
        Tampering(set_field("inclusionPath", lambda b: b["inclusionPath"][:-1])),
        5,
        "inclusion path is too short",
    ),
    "path-too-long": (
        Tampering(set_field("inclusionPath", lambda b: [*b["inclusionPath"], "A" * 43 + "="])),
        5,
        "inclusion path is too long",
    ),
    "tree-size-not-the-checkpoints": (
        Tampering(set_field("treeSize", lambda b: b["treeSize"] + 1)),
        4,
        "size mismatch: bundle treeSize",
    ),
    "checkpoint-root-line-edited": (
        Tampering(edit_root_line),
        3,
        "does not verify: the checkpoint text is not what the key signed",
    ),
    "signed-by-another-key": (Tampering(sign_with_another_key), 3, "no signature by this key"),
    "verifier-key-of-another-log": (Tampering(key=another_logs_key), 3, "no signature by this key"),
    "verifier-key-id-wrong": (
        Tampering(key=wrong_key_id),
        2,
        "verifier key ID does not match the key",
    ),
    "no-verifier-key": (Tampering(key=lambda key: ""), 2, "no verifier key given"),
    "malformed-json": (
        Tampering(text=lambda text: text[:-2]),
        1,
        "pasted text is not valid JSON",
    ),
    "missing-field": (Tampering(delete("treeSize")), 1, 'missing field "treeSize"'),
    "index-not-an-integer": (
        Tampering(set_field("leafIndex", lambda b: str(b["leafIndex"]))),
        1,
        'field "leafIndex" must be a non-negative integer, got the string',
    ),
    "leaf-not-strict-base64": (
        Tampering(set_field("leaf", lambda b: b["leaf"][:40] + "\n" + b["leaf"][40:])),
        1,
        'field "leaf" is not strict base64',
    ),
    "path-hash-too-short": (
        Tampering(set_field("inclusionPath", lambda b: ["AAAA", *b["inclusionPath"][1:]])),
        1,
        "inclusionPath[0] is 3 bytes, want 32",
    ),
}


@pytest.mark.parametrize(("tampering", "failed_check", "message"), TAMPERED.values(), ids=TAMPERED)
def test_a_tampered_bundle_or_wrong_key_fails_at_the_first_broken_check(
    page, story, tampering, failed_check, message
):
    bundle = copy.deepcopy(story.bundles[2])
    if tampering.bundle:
        tampering.bundle(bundle, story)
    text = as_text(bundle)
    if tampering.text:
        text = tampering.text(text)
    page.check(text, tampering.key(story.key) if tampering.key else story.key)
    assert page.verdict == "failed"
    (report,) = page.reports()
    assert report.verdict == "failed"
    assert report.failed is not None, report
    number, detail = report.failed
    assert (number, CHECK_NAMES[number - 1]) == (failed_check, CHECK_NAMES[failed_check - 1]), (
        detail
    )
    assert message in detail, detail
    assert [c.state for c in report.checks] == (
        ["passed"] * (failed_check - 1) + ["failed"] + ["skipped"] * (5 - failed_check)
    )
    assert all(c.text.endswith("— not run") for c in report.checks[failed_check:])
    name = CHECK_NAMES[failed_check - 1]
    assert f"failed at check {failed_check} of 5 ({name})" in report.title
    assert "Failed: 1 of 1 bundle did not verify." in page.summary
    assert f"check {failed_check} ({name}): " in page.summary and message in page.summary


def test_a_checkpoint_with_signatures_by_unknown_keys_still_verifies(page, story):
    bundle = copy.deepcopy(story.bundles[0])
    note = bundle["checkpoint"]
    text = note[: note.rindex("\n\n") + 1]
    witness = Cosigner("witness.example", Ed25519PrivateKey.generate()).cosign(text).line
    stranger = Signer("stranger.example", Ed25519PrivateKey.generate()).signature_line(text)
    bundle["checkpoint"] = note + witness + stranger
    page.check(as_text(bundle), story.key)
    assert page.verdict == "verified", page.summary
    (report,) = page.reports()
    assert_verified(report)
    assert "; 2 signatures by other keys ignored" in report.checks[2].text


# --- witness cosignatures ----------------------------------------------------------------------

# Cosignature times, and how the page shows them.
T1, T2 = 1_700_000_000, 1_700_000_060
T1_UTC, T2_UTC = "2023-11-14T22:13:20Z", "2023-11-14T22:14:20Z"


@dataclass
class Witnesses:
    w1: Cosigner
    w2: Cosigner

    @property
    def keys(self) -> str:
        return f"{self.w1.verifier_key}\n{self.w2.verifier_key}"


@pytest.fixture(scope="module")
def witnesses() -> Witnesses:
    return Witnesses(
        Cosigner("w1.example/w", Ed25519PrivateKey.generate()),
        Cosigner("w2.example/w", Ed25519PrivateKey.generate()),
    )


def cosigned(bundle: dict[str, Any], *lines: Callable[[str], str]) -> dict[str, Any]:
    """A copy of `bundle` whose checkpoint note carries more signature lines, each made from the
    note's text (everything up to the blank line)."""
    text, _ = split_note(bundle["checkpoint"])
    return {**bundle, "checkpoint": bundle["checkpoint"] + "".join(line(text) for line in lines)}


def cosignature(witness: Cosigner, at: int) -> Callable[[str], str]:
    return lambda text: witness.cosign(text, at).line


def altered(line: Callable[[str], str], change: Callable[[bytes], bytes]) -> Callable[[str], str]:
    """A signature line whose decoded bytes (key ID ‖ time ‖ signature) are changed."""

    def make(text: str) -> str:
        head, encoded = line(text).rstrip("\n").rsplit(" ", 1)
        raw = change(base64.b64decode(encoded))
        return f"{head} {base64.b64encode(raw).decode()}\n"

    return make


def flip_signature_byte(raw: bytes) -> bytes:
    return raw[:20] + bytes([raw[20] ^ 0x01]) + raw[21:]  # a byte of the Ed25519 signature


def who(witness: Cosigner) -> str:
    return f"{witness.name}+{witness.key_id.hex()}"


def assert_witnessed(report: Report) -> None:
    assert report.verdict == "verified", report
    assert [(c.name, c.state) for c in report.checks] == [
        (n, "passed") for n in WITNESS_CHECK_NAMES
    ]
    assert "verified: all 6 checks passed" in report.title


def test_a_quorum_of_witnesses_cosigning_the_checkpoint_passes_a_sixth_check(
    page, story, witnesses
):
    w1, w2 = witnesses.w1, witnesses.w2
    stranger = Cosigner("w3.example/w", Ed25519PrivateKey.generate())  # not given: ignored
    bundle = cosigned(
        story.bundles[0], cosignature(w1, T1), cosignature(stranger, T1), cosignature(w2, T2)
    )
    page.check(as_text(bundle), story.key, witnesses=f"{w1.verifier_key}, {w2.verifier_key}")
    assert page.verdict == "verified", page.summary
    assert "Verified: the bundle passes all 6 checks." in page.summary
    (report,) = page.reports()
    assert_witnessed(report)
    assert report.checks[5].text == (
        "✓ Witness quorum: at least 2 of the 2 witnesses cosigned the checkpoint — passed: "
        f"2 of the 2 witnesses cosigned the checkpoint, 2 required: w1.example/w at {T1_UTC}, "
        f"w2.example/w at {T2_UTC}"
    )
    assert "; 3 signatures by other keys ignored" in report.checks[2].text


def test_a_quorum_of_one_is_met_by_one_of_two_witnesses(page, story, witnesses):
    bundle = cosigned(story.bundles[1], cosignature(witnesses.w2, T2))
    page.check(as_text(bundle), story.key, witnesses=witnesses.keys, quorum="1")
    assert page.verdict == "verified", page.summary
    (report,) = page.reports()
    assert_witnessed(report)
    assert (
        f"1 of the 2 witnesses cosigned the checkpoint, 1 required: w2.example/w at {T2_UTC}"
    ) in report.checks[5].text


def test_without_witness_keys_cosignatures_are_ignored_and_five_checks_run(page, story, witnesses):
    bundle = cosigned(
        story.bundles[0], cosignature(witnesses.w1, T1), cosignature(witnesses.w2, T2)
    )
    page.check(as_text(bundle), story.key)
    assert page.verdict == "verified", page.summary
    assert "Verified: the bundle passes all 5 checks." in page.summary
    (report,) = page.reports()
    assert_verified(report)
    assert "; 2 signatures by other keys ignored" in report.checks[2].text


@dataclass
class Witnessing:
    """The lines the checkpoint carries and the witness keys and quorum given to the page."""

    lines: Callable[[Witnesses], list[Callable[[str], str]]]
    keys: Callable[[Witnesses, Story], str] = lambda ws, story: ws.keys
    quorum: str = ""


def both(ws: Witnesses) -> list[Callable[[str], str]]:
    return [cosignature(ws.w1, T1), cosignature(ws.w2, T2)]


WITNESS_FAILURES = {
    "quorum-not-met": (
        Witnessing(lambda ws: [cosignature(ws.w1, T1)]),
        lambda ws: [
            "1 of the 2 witnesses cosigned the checkpoint, 2 required (missing: w2.example/w)",
            f"cosigned: w1.example/w at {T1_UTC}",
        ],
    ),
    "no-cosignature-at-all": (
        Witnessing(lambda ws: [], quorum="1"),
        lambda ws: [
            "0 of the 2 witnesses cosigned the checkpoint, 1 required "
            "(missing: w1.example/w, w2.example/w)"
        ],
    ),
    "cosignature-tampered": (
        Witnessing(
            lambda ws: [
                cosignature(ws.w1, T1),
                altered(cosignature(ws.w2, T2), flip_signature_byte),
            ]
        ),
        lambda ws: [f"bad cosignature: the cosignature by {who(ws.w2)} does not verify"],
    ),
    "cosignature-time-altered": (
        Witnessing(
            lambda ws: [altered(cosignature(ws.w1, T1), lambda r: r[:11] + b"\x01" + r[12:])],
            quorum="0",
        ),
        lambda ws: [f"bad cosignature: the cosignature by {who(ws.w1)} does not verify"],
    ),
    "cosignature-not-76-bytes": (
        Witnessing(lambda ws: [altered(cosignature(ws.w1, T1), lambda r: r[:-1]), *both(ws)[1:]]),
        lambda ws: [f"malformed cosignature: the cosignature by {who(ws.w1)} is 75 bytes, want 76"],
    ),
    "two-cosignatures-by-one-witness": (
        Witnessing(lambda ws: [*both(ws), cosignature(ws.w1, T2)]),
        lambda ws: [
            f"malformed cosignature: the checkpoint carries two cosignatures by {who(ws.w1)}"
        ],
    ),
    "witness-key-id-wrong": (
        Witnessing(
            both, keys=lambda ws, story: f"{ws.w1.verifier_key}\n{wrong_key_id(ws.w2.verifier_key)}"
        ),
        lambda ws: ['witness key "w2.example/w+', "key ID does not match the key"],
    ),
    "log-key-given-as-witness-key": (
        Witnessing(both, keys=lambda ws, story: f"{ws.w1.verifier_key} {story.key}"),
        lambda ws: [
            "key must be 0x04 followed by a 32-byte Ed25519 key, got 33 bytes starting 0x01 "
            "(a log's verifier key)"
        ],
    ),
    "witness-key-given-twice": (
        Witnessing(both, keys=lambda ws, story: f"{ws.keys},{ws.w1.verifier_key}"),
        lambda ws: [f"the witness key {who(ws.w1)} is given twice"],
    ),
    "quorum-above-the-witness-keys": (
        Witnessing(both, quorum="3"),
        lambda ws: ['witness quorum "3": want a whole number from 0 to 2'],
    ),
    "quorum-without-witness-keys": (
        Witnessing(both, keys=lambda ws, story: "", quorum="1"),
        lambda ws: ['a witness quorum of "1" is given but no witness keys'],
    ),
}


@pytest.mark.parametrize(
    ("witnessing", "messages"), WITNESS_FAILURES.values(), ids=WITNESS_FAILURES
)
def test_a_missing_or_bad_cosignature_or_witness_key_fails_the_witness_quorum(
    page, story, witnesses, witnessing, messages
):
    bundle = cosigned(story.bundles[2], *witnessing.lines(witnesses))
    keys = witnessing.keys(witnesses, story)
    page.check(as_text(bundle), story.key, witnesses=keys, quorum=witnessing.quorum)
    assert page.verdict == "failed", page.summary
    (report,) = page.reports()
    assert [c.name for c in report.checks] == list(WITNESS_CHECK_NAMES)
    assert [c.state for c in report.checks] == ["passed"] * 5 + ["failed"], report
    assert "failed at check 6 of 6 (quorum)" in report.title
    assert report.failed is not None
    for message in messages(witnesses):
        assert message in report.failed[1], report.failed[1]
    assert "check 6 (quorum): " in page.summary


def test_a_witness_keys_file_chosen_in_the_file_input_fills_the_witness_keys(
    page, story, witnesses, tmp_path
):
    (tmp_path / "verifier.key").write_text(story.key + "\n")
    (tmp_path / "witnesses.txt").write_text(witnesses.keys + "\n")
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps(cosigned(story.bundles[0], *both(witnesses))))
    page.open()
    chosen = [tmp_path / "verifier.key", tmp_path / "witnesses.txt", bundle]
    page.find("#files").send_keys("\n".join(str(p) for p in chosen))
    page.wait(lambda: len(page.all("#file-list li")) == 1)
    assert page.find("#key").get_attribute("value") == story.key
    assert page.find("#witnesses").get_attribute("value") == witnesses.keys
    assert (
        "verifier.key: verifier key filled in; witnesses.txt: 2 witness keys filled in; "
        "1 file to verify."
    ) in page.find("#file-status").text
    # Chosen again, the same keys are not given twice.
    page.find("#files").send_keys(str(tmp_path / "witnesses.txt"))
    page.wait(lambda: page.find("#file-status").text.startswith("witnesses.txt: 2 witness keys"))
    assert page.find("#witnesses").get_attribute("value") == witnesses.keys
    page.verify()
    assert page.verdict == "verified", page.summary
    (report,) = page.reports()
    assert_witnessed(report)


# --- the hash chain ------------------------------------------------------------------------


def test_a_skipped_version_is_a_gap_in_the_chain(page, story):
    b = story.bundles
    page.check(as_text(b[0], b[1], b[3], b[4]), story.key)
    assert page.verdict == "failed"
    assert page.summary.startswith("✗ Not verified: the hash chain is incomplete.")
    assert "All 4 bundles pass all 5 checks." in page.summary
    assert "Hash chain incomplete: version 3 missing between version 2 and 4." in page.summary
    assert all(r.verdict == "verified" for r in page.reports())
    rows = page.timeline()
    assert [r["Version"] for r in rows] == ["1", "2", "4", "5"]
    assert rows[2]["Chain"] == "✗ gap: version 3 not given"
    assert rows[3]["Chain"] == "✓ links to version 4"
    assert page.chain[0] == "incomplete"


def test_a_bundle_of_another_prescription_breaks_the_chain(page, story):
    b, other = story.bundles, story.other_bundles
    page.check(as_text(b[0], other[1], b[2]), story.key)
    assert page.verdict == "failed"
    assert all(r.verdict == "verified" for r in page.reports())
    verdict, text = page.chain
    assert verdict == "broken"
    assert "the bundles are of 2 prescriptions, not one" in text
    assert f"{story.other_rid} (version 2)" in text
    assert f"version 2 of {story.rid} missing between version 1 and 3" in text
    assert "Hash chain broken: the bundles are of 2 prescriptions" in page.summary
    rows = page.timeline()
    assert {r["Prescription"] for r in rows} == {story.rid, story.other_rid}
    mine = [r for r in rows if r["Prescription"] == story.rid]
    assert mine[1]["Chain"] == "✗ gap: version 2 not given"


def test_a_prev_that_is_not_the_previous_leaf_hash_breaks_the_chain(page, story):
    first, second = story.bundles[0], copy.deepcopy(story.bundles[1])
    header = json.loads(base64.b64decode(second["leaf"]))
    assert header["prev"] == leaf_hash(first)
    header["prev"] = leaf_hash(story.other_bundles[0])
    second["leaf"] = base64.b64encode(
        json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    ).decode()
    page.check(as_text(first, second), story.key)
    assert page.verdict == "failed"
    first_report, second_report = page.reports()
    assert_verified(first_report)
    assert second_report.failed is not None and second_report.failed[0] == 5
    assert "root mismatch" in second_report.failed[1]
    verdict, text = page.chain
    assert verdict == "broken"
    assert (
        f"version 2's prev {leaf_hash(story.other_bundles[0])} is not the leaf hash of "
        f"version 1, {leaf_hash(first)}"
    ) in text
    rows = page.timeline()
    assert rows[1]["Chain"] == "✗ break: prev is not version 1’s leaf hash"
    assert rows[1]["Proof"] == "✗ failed at check 5 (root)"


def test_a_verification_run_starts_from_a_clean_page(page, story):
    page.check(as_text(story.bundles[0]), story.key)
    assert page.verdict == "verified"
    page.find("#clear").click()
    assert page.find("#key").get_attribute("value") == ""
    assert page.driver.switch_to.active_element.get_attribute("id") == "key"
    assert page.summary == "Nothing verified yet."
    assert not page.find("#timeline-section").is_displayed()
    page.verify()
    assert "Nothing to verify: paste a bundle, or choose or drop bundle files." in page.summary


# --- a key set, after a key rotation -----------------------------------------------------------


def test_a_key_set_file_verifies_each_checkpoint_with_the_keys_in_force_at_its_size(
    page, story, tmp_path
):
    """After a rotation the gateway's key signs up to its last size and a new key from its
    first: the page takes the operator's key set file, says which key signed, and refuses a
    checkpoint only a retired key signed past its end."""
    old_bundle, new_bundle = copy.deepcopy(story.bundles[0]), copy.deepcopy(story.bundles[1])
    size = new_bundle["treeSize"]
    new = Signer(story.key.split("+")[0], Ed25519PrivateKey.generate())
    text = new_bundle["checkpoint"][: new_bundle["checkpoint"].rindex("\n\n") + 1]
    new_bundle["checkpoint"] = new.sign_note(text)  # the new key alone signed this one
    key_set = f"{story.key} 0..{size}\n{new.verifier_key} {size}.."
    (tmp_path / "log-keys.txt").write_text(f"# the log's keys\n{key_set}\n")
    (tmp_path / "v1.json").write_text(json.dumps(old_bundle))
    (tmp_path / "v2.json").write_text(json.dumps(new_bundle))
    page.open()
    page.find("#files").send_keys(
        "\n".join(str(tmp_path / n) for n in ("log-keys.txt", "v1.json", "v2.json"))
    )
    page.wait(lambda: len(page.all("#file-list li")) == 2)
    assert page.find("#key").get_attribute("value") == key_set
    page.verify()
    old_label, new_label = "+".join(story.key.split("+")[:2]), f"{new.name}+{new.key_id.hex()}"
    first, second = page.reports()
    for report in (first, second):
        assert_verified(report)
        assert (
            f"2 Ed25519 keys: {old_label} (sizes 0..{size}), {new_label}" in report.checks[1].text
        )
    assert f"signed by {old_label}, origin" in first.checks[2].text
    assert f"signed by {new_label}, origin" in second.checks[2].text

    retired = f"{story.key} 0..{size - 1}\n{new.verifier_key} {size}.."
    page.open()
    page.paste(retired, into="#key")
    page.paste(as_text(old_bundle))
    page.verify()
    (report,) = page.reports()
    assert report.failed is not None and report.failed[0] == 3, report
    assert (
        f"key out of range: the checkpoint of size {size} is signed only by {old_label}"
        in (report.failed[1])
    )
