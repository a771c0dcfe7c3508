"""What the console's browser tests share: Chromium (Playwright), a cloud with operators who sign in with a
password, signing in through the form as a person does, and screenshots with the layout checks a person makes by
eye (nothing cut off or overflowing, no label broken inside a word, a CJK font present, axe-core clean).

Screenshots go to ``tests/screenshots/console``, named ``<name>-<lang>-<width>.png``."""

from __future__ import annotations

import csv
import io
import secrets
from pathlib import Path

import requests

from tests.test_phone_pages import assert_accessible

SHOTS = Path(__file__).parent / "screenshots" / "console"
DESKTOP = {"width": 1366, "height": 768}
WIDE = {"width": 1920, "height": 1080}
TABLET = {"width": 1024, "height": 768}
PASSWORD = "Quan-shui-2026!"
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=1</script>'
LONG_ADDRESS = "浙江省杭州市西湖区文三路四百七十八号华星时代广场A座一楼大堂东侧饮水点"


def make_operator(cloud, role: str, name: str = "", password: str = PASSWORD, display_name: str = "") -> str:
    """An operator who signs in to the console with ``password``, made by the cloud's admin through the API."""
    name = name or f"{role}-{secrets.token_hex(3)}"
    r = cloud.op("POST", "/api/v1/console/operators", json={"operator_id": name, "role": role, "password": password,
                                                           "display_name": display_name})
    assert r.status_code == 200, r.text
    return name


class Console(requests.Session):
    """A console session over HTTP as the page makes it: the cookie, and the CSRF token on changes."""

    def __init__(self, cloud, name: str, password: str = PASSWORD) -> None:
        super().__init__()
        self.base = cloud.url
        r = self.post(self.base + "/api/v1/console/login", json={"name": name, "password": password}, timeout=10)
        assert r.status_code == 200, r.text
        self.csrf = r.json()["csrf_token"]

    def call(self, method: str, path: str, csrf: bool = True, **kw) -> requests.Response:
        headers = {"X-CSRF-Token": self.csrf} if csrf and method != "GET" else {}
        return self.request(method, self.base + path, headers=headers, timeout=10, **kw)


def open_console(browser, cloud, name: str, password: str = PASSWORD, lang: str = "zh", viewport: dict = DESKTOP,
                 hash_: str = ""):
    """A new browser (its own cookies) signed in through the form; every script error and failed request noted
    in ``page.errors`` (a test asserts on the refusals it provoked and none other)."""
    ctx = browser.new_context(viewport=viewport, locale="zh-CN" if lang == "zh" else "en-US")
    page = ctx.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(f"pageerror {e}"))
    page.on("console", lambda m: page.errors.append(m.text)          # a refused request is noted once, below
            if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
    page.on("response", lambda r: page.errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.add_init_script(f"localStorage.setItem('console.lang', '{lang}')")
    page.goto(cloud.url + "/console" + hash_)
    page.wait_for_selector("#signin-name")
    page.fill("#signin-name", name)
    page.fill("#signin-password", password)
    page.click("#signin-go")
    page.wait_for_selector("#shell:not([hidden])")
    page.errors.clear()                  # the 401 of /me before signing in is expected
    return page


def goto(page, hash_: str, ready: str) -> None:
    """Go to a console page by its address and wait for ``ready`` (a selector) to show."""
    page.evaluate(f"location.hash = {hash_!r}")
    page.wait_for_selector(ready)


LAYOUT_JS = """() => {
  const out = [], W = window.innerWidth;
  const say = (what, el) =>
    out.push(what + ': ' + (el.textContent || el.value || el.id || el.tagName).trim().slice(0, 60));
  const shown = (el) => { const r = el.getBoundingClientRect(), cs = getComputedStyle(el);
    return r.width > 0 && r.height > 0 && cs.visibility !== 'hidden' && !el.closest('[hidden]'); };
  if (document.documentElement.scrollWidth > W + 1) out.push('page scrolls sideways');
  const boxes = 'button, .button, label, h1, h2, h3, dt, dd, th, .chip, .stat b, .stat span, p, li, .nav a, .tabs a, '
    + '.crumb, .who';
  for (const el of document.querySelectorAll(boxes)) {
    if (!shown(el)) continue;
    const r = el.getBoundingClientRect();
    if (el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflowX !== 'visible' && !el.matches('.crumb'))
      say('cut off', el);
    if (!el.closest('.tablewrap') && (r.right > W + 1 || r.left < -1)) say('off screen', el);
    const card = el.parentElement && el.parentElement.closest('.card, .stat');
    if (card) {
      const c = card.getBoundingClientRect();
      if (r.left < c.left - 1 || r.right > c.right + 1) say('outside its card', el);
    }
  }
  const seg = new Intl.Segmenter(document.documentElement.lang, {granularity: 'word'});
  const labels = 'button, .button, dt, th, .chip, .stat span, .nav a, .tabs a, h1, h2, h3, label';
  for (const el of document.querySelectorAll(labels)) {
    if (!shown(el)) continue;
    if (el.clientWidth > 0 && el.scrollWidth > el.clientWidth + 1) say('text wider than its box', el);
    const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      if (node.parentElement.closest('input, select, textarea, option')) continue;
      for (const s of seg.segment(node.data)) {
        if (!s.isWordLike || s.segment.length < 2) continue;
        const range = document.createRange();
        range.setStart(node, s.index); range.setEnd(node, s.index + s.segment.length);
        const rects = [...range.getClientRects()].filter((q) => q.width > 0);
        if (rects.length < 2) continue;
        const tops = rects.map((q) => q.top), h = Math.min(...rects.map((q) => q.height));
        if (Math.max(...tops) - Math.min(...tops) > h / 2) say(`"${s.segment}" broken inside the word`, el);
      }
    }
  }
  for (const el of document.querySelectorAll('button, .button, .nav a, input:not([type=checkbox]), select')) {
    if (!shown(el)) continue;
    const r = el.getBoundingClientRect();
    if (r.height < 27.5 || r.width < 27.5) say(`target ${Math.round(r.width)}x${Math.round(r.height)} px`, el);
  }
  return out;
}"""


def shot(page, name: str, full: bool = True) -> Path:
    """A screenshot (looked at by a person before an issue is closed), then the layout and accessibility checks."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_load_state("networkidle")
    lang = page.evaluate("document.documentElement.lang").split("-")[0]
    path = SHOTS / f"{name}-{lang}-{page.viewport_size['width']}.png"
    page.screenshot(path=str(path), full_page=full)
    problems = page.evaluate(LAYOUT_JS)
    assert problems == [], f"{path.name}: {problems}"
    assert page.evaluate("() => document.fonts.check('16px \"Noto Sans CJK SC\"', '饮水机')"), \
        "no CJK font: Chinese would render as boxes (install fonts-noto-cjk)"
    assert_accessible(page, path.name)
    assert not page.evaluate("() => window.__xss"), "a user-controlled string ran as script"
    return path


def download_csv(page, link: str = "a:has-text('导出 CSV')") -> list[list[str]]:
    """Click a CSV link as a person does and read the file the browser saved: it starts with a byte-order mark
    (Excel reads Chinese right only then), and its rows come back parsed."""
    with page.expect_download() as dl:
        page.click(link)
    raw = Path(dl.value.path()).read_bytes()
    assert raw.startswith("\ufeff".encode()), "a CSV for Excel starts with a byte-order mark"
    return list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
