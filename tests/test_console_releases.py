"""The console's software-updates page in Chromium (issue 22), in Chinese and English at 1366 px: an admin uploads
a tampered bundle through the file input (refused, in words) and then a good one, creates a rollout of ticked
machines, sees the machines' steps as they report and heartbeat, and pauses it; a viewer sees it all and no
button that changes anything. One machine's steps open in a dialog, oldest first, with the report its heartbeat
overtook marked as late, at 1366 px and the tablet's 1024 px."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.cloudkit import CloudServer
from tests.consolekit import DESKTOP, TABLET, goto, make_operator, open_console, shot
from tests.test_bundle import members, write
from tests.test_releases import MAKE, make, report, upload


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console-bundles")
    subprocess.run([*MAKE, "--new-key", str(tmp / "release.pem")], check=True, capture_output=True)
    good = make(tmp, tmp / "release.pem", "0.3.0")
    tampered = write(tmp / "tapshare-0.3.0-tampered.bundle", {**members(good), "app/main.py": b"print('evil')\n"})
    return {"pub": tmp / "release.pub.pem", "good": good, "tampered": tampered}


@pytest.fixture
def cloud(tmp_path, bundles):
    with CloudServer(tmp_path / "cloud") as c:
        c.settings.release_keys_dir.mkdir(parents=True)
        shutil.copy(bundles["pub"], c.settings.release_keys_dir / "release.pub.pem")
        make_operator(c, "admin", "boss")
        make_operator(c, "viewer", "kan.kan")
        c.devs = {m: c.provision(m) for m in ("M-A", "M-B", "M-C")}
        for d in c.devs.values():
            assert d.heartbeat(software_version="0.2.0").status_code == 200
        yield c


WORDS = {"zh": {"tampered": "文件被篡改", "paused": "已暂停", "updated": "已升级 1", "downloading": "下载中 1",
                "progress": "1/2 台已升级", "heartbeat": "心跳显示已运行新版本"},
         "en": {"tampered": "Tampered", "paused": "Paused", "updated": "Updated 1", "downloading": "Downloading 1",
                "progress": "1/2 updated", "heartbeat": "its heartbeat says it runs the new version"}}


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_an_admin_uploads_rolls_out_and_pauses(cloud, browser, bundles, lang):
    w = WORDS[lang]
    page = open_console(browser, cloud, "boss", lang=lang, hash_="#/releases")
    page.wait_for_selector("#page-releases #upload-release")
    page.set_input_files("#release-file", str(bundles["tampered"]))
    page.wait_for_selector(f"#upload-progress.bad:has-text('{w['tampered']}')")
    assert cloud.op("GET", "/api/v1/operator/releases").json()["releases"] == []
    assert [e.split()[0] for e in page.errors] == ["422"]
    shot(page, "releases-refused")
    page.errors.clear()

    page.set_input_files("#release-file", str(bundles["good"]))
    page.wait_for_selector("#page-releases tr[data-key='0.3.0']")
    assert cloud.op("GET", "/api/v1/operator/releases").json()["releases"][0]["version"] == "0.3.0"

    page.click("#new-rollout")
    page.wait_for_selector("dialog tr[data-key='M-A']")
    page.click("#rollout-go")                                       # nothing ticked: said, nothing sent
    page.wait_for_selector("dialog .field-error:not(:empty)")
    page.check("dialog tr[data-key='M-A'] input[type=checkbox]")
    page.check("dialog tr[data-key='M-B'] input[type=checkbox]")
    page.fill("#rollout-max-rb", "30")
    shot(page, "releases-new-rollout")
    page.click("#rollout-go")
    page.wait_for_selector("#pause-1")
    ro = cloud.op("GET", "/api/v1/operator/rollouts/1").json()
    assert [m["machine_id"] for m in ro["machines"]] == ["M-A", "M-B"] and ro["max_rollback_pct"] == 30

    # the machines answer: M-A downloads, M-B comes back running the new release
    offer = cloud.devs["M-A"].heartbeat(software_version="0.2.0").json()["update"]
    assert offer["rollout_id"] == 1
    assert report(cloud.devs["M-A"], 1, "downloading").json()["recorded"]
    assert "update" not in cloud.devs["M-C"].heartbeat(software_version="0.2.0").json()
    assert "update" not in cloud.devs["M-B"].heartbeat(software_version="0.3.0").json()
    goto(page, "#/fleet", "#page-fleet")
    goto(page, "#/releases", f"#page-releases tr[data-key='1']:has-text('{w['updated']}')")
    row = page.inner_text("#page-releases tr[data-key='1']")
    assert w["downloading"] in row and w["progress"] in row
    shot(page, "releases")

    page.click("#pause-1")
    page.wait_for_selector(f"#page-releases tr[data-key='1'] .chip:has-text('{w['paused']}')")
    assert cloud.op("GET", "/api/v1/operator/rollouts/1").json()["state"] == "paused"
    assert "update" not in cloud.devs["M-A"].heartbeat(software_version="0.2.0").json()

    page.click("#page-releases tr[data-key='1'] a[href='#/releases/1']")
    page.wait_for_selector("#page-releases tr[data-key='M-B']")
    assert "0.3.0" in page.inner_text("tr[data-key='M-B']") and w["heartbeat"] in page.inner_text("tr[data-key='M-B']")
    assert page.locator("#resume-1").count() == 1
    shot(page, "rollout")
    assert page.errors == []
    page.context.close()

    viewer = open_console(browser, cloud, "kan.kan", lang=lang, hash_="#/releases/1")
    viewer.wait_for_selector("#page-releases tr[data-key='M-A']")
    goto(viewer, "#/releases", "#page-releases tr[data-key='0.3.0']")
    assert viewer.locator("#upload-release, #new-rollout, #resume-1, #stop-1").count() == 0
    assert viewer.errors == []
    viewer.context.close()


LONG_DETAIL = ("设备正在出水：用户会话 S-20261206-0001 仍未结束，等待空闲后再切换到新版本"
               "（已等待约十二分钟，期间共检查七次，每次都在出水或有会话进行中）")
LATE_DETAIL = "已切换到新版本 0.3.0，旧版本保留在 previous 目录以便回滚；新版本启动后等待心跳确认"
HISTORY_WORDS = {"zh": {"title": "设备 M-A 的升级步骤（批次 1）", "late": "晚到：未改变当前步骤", "repeats": "共 3 次",
                        "heartbeat": "心跳", "busy": "设备忙", "now": "已升级"},
                 "en": {"title": "Update steps of M-A (rollout 1)", "late": "arrived late: current step unchanged",
                        "repeats": "3 times", "heartbeat": "heartbeat", "busy": "busy", "now": "Updated"}}


@pytest.mark.parametrize("viewport", [DESKTOP, TABLET], ids=["1366", "1024"])
@pytest.mark.parametrize("lang", ["zh", "en"])
def test_a_viewer_opens_one_machines_steps(cloud, browser, bundles, lang, viewport):
    """The heartbeat of the new release marks M-A healthy before its ``switched`` report arrives: the dialog shows
    every step in the order received, the deferred repeats as one, and the late report with its detail."""
    w = HISTORY_WORDS[lang]
    assert upload(cloud, bundles["good"]).status_code == 200
    assert cloud.op("POST", "/api/v1/operator/rollouts", json={"version": "0.3.0", "machine_ids": ["M-A", "M-B"]}
                    ).status_code == 200
    dev = cloud.devs["M-A"]
    for step in ("downloading", "downloaded", "verified", "installed"):
        assert report(dev, 1, step).json()["recorded"]
    for _ in range(3):
        assert report(dev, 1, "deferred", reason="busy", detail=LONG_DETAIL).json()["recorded"]
    assert "update" not in dev.heartbeat(software_version="0.3.0").json()          # healthy, by the heartbeat
    assert report(dev, 1, "switched", detail=LATE_DETAIL, running_version="0.2.0").json() == {"recorded": False}

    page = open_console(browser, cloud, "kan.kan", lang=lang, viewport=viewport, hash_="#/releases/1")
    page.click("#page-releases tr[data-key='M-A'] button.history")
    page.wait_for_selector("#step-history li.late[data-step='switched']")
    dlg = page.locator("#step-history")
    text = dlg.inner_text()
    assert w["title"] in text and w["repeats"] in text and w["busy"] in text and w["late"] in text
    assert dlg.locator("form > .line .chip").inner_text() == w["now"]                 # the current step
    steps = dlg.locator("li").evaluate_all("els => els.map(e => [e.dataset.step, e.classList.contains('late')])")
    assert steps == [["pending", False], ["downloading", False], ["downloaded", False], ["verified", False],
                     ["installed", False], ["deferred", False], ["healthy", False], ["switched", True]]
    assert LONG_DETAIL in dlg.locator("li[data-step='deferred'] .detail").inner_text()
    late = dlg.locator("li[data-step='switched']").inner_text()
    assert LATE_DETAIL in late and "0.2.0" in late
    assert w["heartbeat"] in dlg.locator("li[data-step='healthy']").inner_text()
    assert re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", dlg.locator("li[data-step='switched'] .line").inner_text())
    shot(page, "rollout-steps" + ("-tablet" if viewport is TABLET else ""))
    page.click("#history-close")
    page.wait_for_selector("#step-history", state="detached")
    assert page.errors == []
    page.context.close()
