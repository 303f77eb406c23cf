"""What the browser tests share: Debian's headless Chromium driven by selenium (chromedriver), with
autoplay allowed and the fake capture device (a wav file as the microphone), and the page's status
line (``#status``, whose ``data-state`` the page sets) to wait on."""
import contextlib
import importlib.util
import shutil
import tempfile

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",   # the microphone: a wav file
)


PHOTO_BOX = "40 200 60 196"  # top bottom left right of the face in the tests' 256x256 photo


@contextlib.contextmanager
def page_server(assets):
    """A ``serve.py`` (tests.serving.Server) with ``assets["ckpt"]``, avatars and log under
    ``assets["dir"]``; stopped on exit."""
    from serving import Server

    server = Server(assets["ckpt"], assets["dir"] / "avatars", assets["dir"] / "server.log")
    try:
        yield server
    finally:
        server.stop()


def photo_avatar(server, photo) -> str:
    """The avatar id of ``photo`` uploaded to ``server`` with the face at PHOTO_BOX."""
    response = server.upload(photo, box=PHOTO_BOX)
    assert response.status_code == 201, response.text
    return response.json()["avatar_id"]


def missing():
    """Why the browser tests cannot run here (a sentence to skip with), or None when they can."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
    return None


def chromium(folder, microphone_wav, script_timeout=30):
    """A headless Chromium (selenium WebDriver) with a fresh profile under ``folder``, whose fake
    microphone plays ``microphone_wav`` in a loop; its console is kept (``get_log("browser")``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-", dir=str(folder))
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--use-file-for-fake-audio-capture={microphone_wav}")  # looped
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(script_timeout)
    return driver


def state(browser):
    """The page's state: ``data-state`` of ``#status`` (idle, busy, streaming, live, done, error)."""
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, "status").get_attribute("data-state")


def wait_state(browser, states, timeout):
    """Wait up to ``timeout`` seconds until the page's status is one of ``states``; an error shown on
    the page fails the test at once, with the page's message and console."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def done(d):
        s = state(d)
        if s == "error":
            raise AssertionError("the page shows an error: " + d.find_element(By.ID, "error").text
                                 + f"\nconsole: {d.get_log('browser')}")
        return s in states

    WebDriverWait(browser, timeout, poll_frequency=0.1).until(done)


def errors_logged(browser):
    """SEVERE entries of the browser console since the last read."""
    return [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
