"""The dashboard in a real browser (headless Chromium driven by Selenium): the runs page lists a run, its
loss chart draws points (counted on the canvas's pixels), two runs overlay, the data view highlights image
and label tokens, the side-by-side page shows one answer per adapter, equal to the API's, and the page of
a run that is training follows it live. Screenshots go to
test-artifacts/ui/ (or $VLMTUNE_ARTIFACTS/ui/).

Chromium and chromedriver come from Debian's `chromium` and `chromium-driver` packages (`make browser`,
which `make test` runs); without them this test is skipped and says so."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

import vlmtune
from test_ui_support import FAMILY, Page, copy_run, serve, train_config
from vlmtune.demo import write_split
from vlmtune.ui import UiSettings

ARTIFACTS = Path(os.environ.get("VLMTUNE_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts")) / "ui"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
PROMPT = "What colour is the shape?"


def find_browser() -> tuple[str, str]:
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip(
            "no headless browser: install Debian's chromium and chromium-driver packages (`make browser` does, "
            f"as root) to run the browser test (found browser={browser}, chromedriver={driver})"
        )
    return browser, driver


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = find_browser()
    options = Options()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1360,1000",
    ):
        options.add_argument(arg)
    instance = webdriver.Chrome(service=Service(chromedriver), options=options)
    instance.set_page_load_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield instance
    instance.quit()


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    base = tiny_model(FAMILY)
    root = tmp_path_factory.mktemp("ui-browser")
    data = write_split(root / "data", "train", 16, seed=0)
    config = train_config(base, data, root / "runs" / "shapes", steps=30, save_steps=15)
    config["data"]["eval_split"] = 0.25
    config["eval_steps"] = 5
    run_dir = vlmtune.train(config)
    other = copy_run(
        run_dir, root / "runs" / "shapes-b"
    )  # a second run to compare (its config differs in lr)
    (other / "config.yaml").write_text((run_dir / "config.yaml").read_text().replace("lr: 0.01", "lr: 0.02"))
    adapters = {"final": run_dir / "adapter", "early": run_dir / "checkpoints" / "step-15"}
    engine = vlmtune.load(base, adapters, device="cpu")
    return base, root, adapters, engine, root / "data" / "images" / "train" / "0.png"


def wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


CHART_PIXELS = """
const c = document.getElementById(arguments[0]);
if (!c) return -1;
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let n = 0;
for (let i = 0; i < d.length; i += 4) if (d[i + 2] > 180 && d[i] < 90 && d[i + 1] < 140 && d[i + 3] > 0) n++;
return n;
"""


def test_pages_in_a_real_browser(driver, setup):
    from selenium.webdriver.common.by import By

    base, root, adapters, engine, image = setup
    settings = UiSettings(runs=[root / "runs"], model=str(base), adapters=adapters, merge_dir=root / "merged")
    with serve(settings, engine) as url:
        driver.get(url + "/")
        row = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-run="runs/shapes"]'))[0]
        assert row.find_element(By.CSS_SELECTOR, "[data-state]").text == "finished"
        assert "30" in row.text
        driver.save_screenshot(str(ARTIFACTS / "runs.png"))

        for run_id in ("runs/shapes", "runs/shapes-b"):
            driver.find_element(By.CSS_SELECTOR, f'input.pick[value="{run_id}"]').click()
        driver.find_element(By.ID, "compare").click()
        overlay = wait(driver, lambda d: d.find_elements(By.ID, "cmp-loss"))[0]
        assert overlay.get_attribute("data-series") == "runs/shapes,runs/shapes-b"
        diff = driver.find_element(By.CSS_SELECTOR, "table.diff tbody").text
        assert diff.split() == ["lr", "0.01", "0.02"]
        driver.save_screenshot(str(ARTIFACTS / "compare.png"))

        driver.get(url + "/")
        row = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-run="runs/shapes"]'))[0]
        row.find_element(By.LINK_TEXT, "runs/shapes").click()
        wait(driver, lambda d: int(d.find_element(By.ID, "chart-loss").get_attribute("data-points") or 0) > 0)
        canvas = driver.find_element(By.ID, "chart-loss")
        assert canvas.get_attribute("data-series") == "loss,eval_loss"
        assert int(canvas.get_attribute("data-points")) == 30 + 6  # 30 train steps, eval at 5, 10, ..., 30
        assert driver.execute_script(CHART_PIXELS, "chart-loss") > 100  # the blue loss line is on the canvas
        assert driver.find_elements(By.ID, "chart-learning_rate")
        assert int(driver.find_element(By.ID, "chart-padding_ratio").get_attribute("data-points")) == 30
        driver.save_screenshot(str(ARTIFACTS / "run.png"))

        driver.get(url + "/#/data?id=runs/shapes")
        wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".tokens .tok-label"))
        assert driver.find_elements(By.CSS_SELECTOR, ".tokens .tok-image")
        assert driver.find_elements(By.CSS_SELECTOR, ".row-images img")
        driver.save_screenshot(str(ARTIFACTS / "data.png"))

        driver.get(url + "/#/adapters")
        wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "div.inspect table")) >= 3)
        driver.save_screenshot(str(ARTIFACTS / "adapters.png"))

        driver.get(url + "/#/gallery")
        wait(driver, lambda d: d.find_elements(By.ID, "ask"))
        driver.find_element(By.ID, "image").send_keys(str(image))
        wait(
            driver,
            lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/png"),
        )
        driver.find_element(By.ID, "prompt").send_keys(PROMPT)
        driver.find_element(By.ID, "ask").click()
        cards = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".answer"), timeout=120)
        shown = {
            c.get_attribute("data-adapter"): c.find_element(By.CSS_SELECTOR, ".text").text for c in cards
        }
        driver.save_screenshot(str(ARTIFACTS / "gallery.png"))

        image_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        api = Page(url).post(
            "/api/generate",
            {
                "prompt": PROMPT,
                "image": image_url,
                "adapters": ["__base__", "final", "early"],
                "max_new_tokens": 32,
            },
        )
        expected = {a["adapter"]: a["text"] for a in api.json()["answers"]}
    assert list(shown) == ["__base__", "final", "early"]
    assert shown == {k: v.strip() for k, v in expected.items()}


def test_live_chart_follows_a_training_run(driver, tiny_model, tmp_path):
    """The run page of a run that is training grows its loss chart as metrics.jsonl grows, and shows the
    state change to finished, without a reload."""
    import threading

    from selenium.webdriver.common.by import By

    from test_ui_runs import Gate

    base = tiny_model(FAMILY)
    data = write_split(tmp_path / "data", "train", 16, seed=2)
    (tmp_path / "runs").mkdir()
    gate = Gate(3)
    errors: list[BaseException] = []

    def train() -> None:
        try:
            vlmtune.train(train_config(base, data, tmp_path / "runs" / "live", steps=6), callbacks=[gate])
        except BaseException as exc:
            errors.append(exc)
            gate.reached.set()

    with serve(UiSettings(runs=[tmp_path / "runs"])) as url:
        thread = threading.Thread(target=train, daemon=True)
        thread.start()
        try:
            assert gate.reached.wait(300) and not errors, errors
            driver.get(url + "/#/run?id=runs/live")
            points = lambda d: int(d.find_element(By.ID, "chart-loss").get_attribute("data-points") or 0)  # noqa: E731
            wait(driver, lambda d: d.find_elements(By.ID, "chart-loss") and points(d) == 3)
            assert driver.find_element(By.CSS_SELECTOR, "#run-state [data-state]").text == "running"
        finally:
            gate.release.set()
        thread.join(300)
        assert not errors, errors
        wait(driver, lambda d: points(d) == 6)
        wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#run-state [data-state]").text == "finished")
        driver.save_screenshot(str(ARTIFACTS / "live.png"))
